#!/usr/bin/env bash
# s3ec-client.sh — the official AWS S3 Encryption Client for Python in a venv of its own, for the S3EC interop tests
# (issue 12; tests/tools/s3ec.py is the CLI the Rust tests run with it).
#
# amazon-s3-encryption-client-python 4.0.0 needs cryptography >= 48, which LocalStack 4.14's pins (cryptography < 44)
# exclude: it cannot share the LocalStack venv of scripts/s3-server.sh.
#
# Usage:
#   scripts/s3ec-client.sh install   # create the venv if needed (idempotent; cached), write $TEST_HOME/s3ec.env
#   scripts/s3ec-client.sh env       # print that env (eval "$(scripts/s3ec-client.sh env)")
#   scripts/s3ec-client.sh python    # print the venv's python
#
# Environment:
#   S3CRYPTFS_TEST_HOME   cache dir shared with s3-server.sh (default ~/.cache/s3cryptfs-test); the venv is
#                         $TEST_HOME/venv-s3ec-4.0.0, the env file $TEST_HOME/s3ec.env
#
# s3ec.env exports S3CRYPTFS_TEST_S3EC_PYTHON=<venv python>. The endpoint and credentials that tests/tools/s3ec.py
# uses come from the S3/KMS server's own env file (server.env of scripts/s3-server.sh).
#
# Measured on the 2-core Debian 12 machine (2026-12-02):
#   first install (venv + pip, pip cache empty: PIP_NO_CACHE_DIR=1)   6.1-8.4 s (cargo building meanwhile); 12 packages,
#                                                                      all wheels: nothing is compiled
#   later runs: install is skipped (stamp file + an import check)      0.2-0.5 s
#
# Python: the client needs >= 3.10. Debian 12's python3 (3.11, with the python3-venv package that .ci/run installs)
# is enough; a pyenv 3.12/3.13 is taken first when there is one (the same interpreters LocalStack uses here).
#
# Quirks of the official client against LocalStack 4.14.0, all checked here (details in tests/tools/s3ec.py):
#   * custom endpoints: the client takes ready boto3 clients; hand it one made with endpoint_url for S3 and one for
#     KMS (it has no endpoint setting of its own, and none for KMS). Path style is set explicitly on the S3 client
#     (botocore 1.44 picks it by itself for 127.0.0.1/localhost, not for other host names).
#   * it hooks the boto3 S3 client it wraps: read raw ciphertext and metadata with a second, plain client.
#   * checksums: nothing to set. botocore's default CRC32 (PutObject, UploadPart) and the payload hash are computed
#     after the client's encrypting hook, i.e. over the ciphertext; LocalStack checks them. Multipart objects get
#     LocalStack's own CRC64NVME full-object checksum (CreateMultipartUpload names no algorithm).
#   * commitment policy: reading V2 needs REQUIRE_ENCRYPT_ALLOW_DECRYPT or FORBID_ENCRYPT_ALLOW_DECRYPT (the default
#     REQUIRE_ENCRYPT_REQUIRE_DECRYPT refuses V2); writing V2 needs FORBID_ENCRYPT_ALLOW_DECRYPT with
#     ALG_AES_256_GCM_IV12_TAG16_NO_KDF.
#   * KmsKeyring needs a key id and sends it as KeyId to KMS Decrypt.
#   * only a KMS keyring (kms+context): no raw AES/RSA wrapping, no instruction-file writes, no ranged GET.
set -euo pipefail

S3EC_VERSION=4.0.0
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

TEST_HOME="${S3CRYPTFS_TEST_HOME:-$HOME/.cache/s3cryptfs-test}"
VENV="$TEST_HOME/venv-s3ec-$S3EC_VERSION"
ENV_FILE="$TEST_HOME/s3ec.env"
LOCK_FILE="$TEST_HOME/.install.lock"      # the same lock as the server venvs
CONSTRAINTS=/dev/null                    # the pins are all here, below

# pip freeze of a working install (2026-12-02, Python 3.11 and 3.12). The client's own requirements:
# attrs>=26.1,<27; boto3>=1.43.6,<2; cryptography>=48,<49. Changing this list triggers a reinstall.
PIP_PACKAGES=(
    "amazon-s3-encryption-client-python==$S3EC_VERSION"
    attrs==26.1.0
    boto3==1.44.8
    botocore==1.44.8
    cffi==2.1.1
    cryptography==48.0.1
    jmespath==1.1.0
    pycparser==3.12
    python-dateutil==2.9.0.post0
    s3transfer==0.19.3
    six==1.17.0
    urllib3==2.8.0
)

SERVER_NAME=s3ec-client
# shellcheck source=lib/server-common.sh
. "$SCRIPT_DIR/lib/server-common.sh"

find_python() {
    local roots=() r v cand
    if command -v pyenv >/dev/null 2>&1; then roots+=("$(pyenv root)"); fi
    roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
    for v in 3.12 3.13; do
        for r in "${roots[@]}"; do
            for cand in $(ls -d "$r"/versions/"$v".* 2>/dev/null | sort -rV); do
                if [[ -x "$cand/bin/python$v" ]]; then echo "$cand/bin/python$v"; return 0; fi
            done
        done
    done
    for cand in /usr/bin/python3 "$(command -v python3 2>/dev/null || true)"; do
        [[ -n "$cand" && -x "$cand" ]] || continue
        if "$cand" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

venv_ok() {
    [[ -x "$VENV/bin/python" && -f "$VENV/.s3cryptfs-installed" ]] \
        && [[ "$(cat "$VENV/.s3cryptfs-installed")" == "$(install_stamp)" ]] \
        && "$VENV/bin/python" -c 'import s3_encryption, boto3' 2>/dev/null
}

write_env() {
    local tmp="$ENV_FILE.tmp.$$"
    cat > "$tmp" <<EOF
# Written by scripts/s3ec-client.sh install ($(date -u +%Y-%m-%dT%H:%M:%SZ)): amazon-s3-encryption-client-python $S3EC_VERSION
# The python that runs tests/tools/s3ec.py (the official S3 Encryption Client and its own boto3).
export S3CRYPTFS_TEST_S3EC_PYTHON=$VENV/bin/python
EOF
    mv "$tmp" "$ENV_FILE"
}

cmd_install() {
    if venv_ok; then write_env; return 0; fi
    local py; py="$(find_python)" || die "the S3 Encryption Client needs Python >= 3.10 with venv and none was found.
  Debian: apt-get install -y python3 python3-venv (Debian 12's 3.11 is enough), or pyenv install 3.12."
    local t0; t0="$(now)"
    log "installing amazon-s3-encryption-client-python $S3EC_VERSION into $VENV (with $py)"
    mkdir -p "$TEST_HOME"
    rm -rf "$VENV"
    "$py" -m venv "$VENV" || die "could not create venv with $py"
    local pip_log="$TEST_HOME/pip-install-s3ec.log"
    if ! "$VENV/bin/pip" install --disable-pip-version-check --no-input -q "${PIP_PACKAGES[@]}" >"$pip_log" 2>&1; then
        tail -n 30 "$pip_log" >&2
        die "pip install failed (full log: $pip_log)"
    fi
    "$VENV/bin/pip" check >>"$pip_log" 2>&1 || { tail -n 10 "$pip_log" >&2; die "pip check failed in $VENV"; }
    "$VENV/bin/python" -c 'import s3_encryption, boto3' \
        || die "venv $VENV was installed but s3_encryption/boto3 do not import"
    install_stamp > "$VENV/.s3cryptfs-installed"
    write_env
    log "installed in $(elapsed "$t0") s"
}

case "${1:-}" in
    install) with_lock cmd_install; log "venv ready: $VENV; env: $ENV_FILE" ;;
    env) [[ -s "$ENV_FILE" ]] || die "no $ENV_FILE: run scripts/s3ec-client.sh install first"; cat "$ENV_FILE" ;;
    python) venv_ok || die "no working venv at $VENV: run scripts/s3ec-client.sh install"; echo "$VENV/bin/python" ;;
    *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
