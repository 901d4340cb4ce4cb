//! Key rotation without re-encrypting content. (Skeleton: the command is wired; rotation is being written.)

use crate::cli::RekeyArgs;

pub fn rekey_command(_args: RekeyArgs) -> anyhow::Result<()> {
    anyhow::bail!("`s3cryptfs rekey` is not available yet")
}
