//! Static credentials and region from the AWS shared config files (`~/.aws/credentials`,
//! `~/.aws/config`), because object_store reads only environment variables.
//!
//! Only what users commonly keep there is understood: `aws_access_key_id`,
//! `aws_secret_access_key`, `aws_session_token` and `region` of one profile (`AWS_PROFILE`, else
//! `default`). SSO, `credential_process` and `role_arn` profiles are not: they are reported with
//! a warning and object_store's own chain (environment, web identity, ECS, IMDS) applies.
//! File locations follow the AWS CLI: `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`, with `~`
//! expanded. In the config file a profile's section is `[profile NAME]` (`[default]` for the
//! default); in the credentials file it is `[NAME]`. Settings in the credentials file win.

use std::fmt;
use std::path::PathBuf;

use super::error::StoreError;

/// Settings found for one profile.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProfileSettings {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
}

impl fmt::Debug for ProfileSettings {
    // Secrets never reach logs or error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "[redacted]");
        f.debug_struct("ProfileSettings")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("region", &self.region)
            .finish()
    }
}

/// Keys we recognise but cannot act on; their presence explains missing static credentials.
const UNSUPPORTED_KEYS: [&str; 4] = [
    "credential_process",
    "sso_session",
    "sso_start_url",
    "role_arn",
];

/// Pure parser: pick `profile` out of the two files' texts. `found` tells whether either file
/// had a section for it.
pub fn parse_profile(
    credentials: Option<&str>,
    config: Option<&str>,
    profile: &str,
) -> (ProfileSettings, bool) {
    let mut out = ProfileSettings::default();
    let mut found = false;
    let config_section = if profile == "default" {
        "default".to_owned()
    } else {
        format!("profile {profile}")
    };
    // Config first, then the credentials file on top, so the credentials file wins.
    let sources = [
        (config, vec![config_section, format!("profile {profile}")]),
        (credentials, vec![profile.to_owned()]),
    ];
    for (text, sections) in sources {
        let Some(text) = text else { continue };
        for (section, key, value) in entries(text) {
            if !sections.contains(&section) {
                continue;
            }
            found = true;
            let slot = match key.as_str() {
                "aws_access_key_id" => &mut out.access_key_id,
                "aws_secret_access_key" => &mut out.secret_access_key,
                "aws_session_token" => &mut out.session_token,
                "region" => &mut out.region,
                k if UNSUPPORTED_KEYS.contains(&k) => {
                    tracing::warn!(profile, setting = k, "AWS profile setting is not supported by s3cryptfs; use environment credentials instead");
                    continue;
                }
                _ => continue,
            };
            if !value.is_empty() {
                *slot = Some(value.to_owned());
            }
        }
    }
    (out, found)
}

/// `(section, lower-cased key, value)` for every property line of an INI-style AWS file.
fn entries(text: &str) -> Vec<(String, String, &str)> {
    let mut out = Vec::new();
    let mut section: Option<String> = None;
    for raw in text.lines() {
        // Indented lines continue a nested property (e.g. `s3 =` blocks); none we need.
        if raw.starts_with([' ', '\t']) && !raw.trim().is_empty() {
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(inner) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            // Normalise `[ profile   name ]` spacing so lookups compare exact strings.
            section = Some(inner.split_whitespace().collect::<Vec<_>>().join(" "));
            continue;
        }
        let (Some(sec), Some((k, v))) = (&section, line.split_once('=')) else {
            continue;
        };
        out.push((sec.clone(), k.trim().to_ascii_lowercase(), v.trim()));
    }
    out
}

/// Read the files named by the environment (`env` looks up a variable) and return the settings
/// of the selected profile. Missing files are fine; an explicitly selected profile that exists
/// in neither file, an unreadable file, or a key id without a secret is an error.
pub fn load_profile(env: &dyn Fn(&str) -> Option<String>) -> Result<ProfileSettings, StoreError> {
    let explicit = env("AWS_PROFILE");
    let profile = explicit.clone().unwrap_or_else(|| "default".to_owned());
    let home = env("HOME").map(PathBuf::from);
    let locate = |var: &str, default: &str| -> Option<PathBuf> {
        match env(var) {
            Some(p) => match (p.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => Some(h.join(rest)),
                _ => Some(PathBuf::from(p)),
            },
            None => home.as_ref().map(|h| h.join(default)),
        }
    };
    let cred_path = locate("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let config_path = locate("AWS_CONFIG_FILE", ".aws/config");
    let read = |p: &Option<PathBuf>| -> Result<Option<String>, StoreError> {
        let Some(p) = p else { return Ok(None) };
        match std::fs::read_to_string(p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::invalid(format!(
                "cannot read the AWS file {} ({e}); fix its permissions or point AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE elsewhere",
                p.display()
            ))),
        }
    };
    let (creds, config) = (read(&cred_path)?, read(&config_path)?);
    let (settings, found) = parse_profile(creds.as_deref(), config.as_deref(), &profile);
    if explicit.is_some() && !found {
        let show = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(no HOME)".to_owned())
        };
        return Err(StoreError::invalid(format!(
            "AWS_PROFILE={profile} names a profile that is in neither {} nor {}; fix AWS_PROFILE or add the profile",
            show(&cred_path),
            show(&config_path)
        )));
    }
    if settings.access_key_id.is_some() != settings.secret_access_key.is_some() {
        return Err(StoreError::invalid(format!(
            "AWS profile {profile} has only one of aws_access_key_id and aws_secret_access_key; set both"
        )));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const CREDS: &str = "\
# comment
[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key = secretdefault

[work]
aws_access_key_id=AKIDWORK
aws_secret_access_key = secret=with=equals
aws_session_token = tok
";
    const CONFIG: &str = "\
[default]
region = eu-west-1
[profile work]
region = us-west-2
s3 =
  max_concurrent_requests = 20
  region = nested-ignored
[work]
region = ignored-without-profile-prefix
[profile sso]
sso_session = corp
region = ap-south-1
";

    #[test]
    fn picks_default_and_named_profiles() {
        let (d, found) = parse_profile(Some(CREDS), Some(CONFIG), "default");
        assert!(found);
        assert_eq!(d.access_key_id.as_deref(), Some("AKIDDEFAULT"));
        assert_eq!(d.secret_access_key.as_deref(), Some("secretdefault"));
        assert_eq!(d.session_token, None);
        assert_eq!(d.region.as_deref(), Some("eu-west-1"));

        let (w, _) = parse_profile(Some(CREDS), Some(CONFIG), "work");
        assert_eq!(w.access_key_id.as_deref(), Some("AKIDWORK"));
        assert_eq!(w.secret_access_key.as_deref(), Some("secret=with=equals"));
        assert_eq!(w.session_token.as_deref(), Some("tok"));
        assert_eq!(w.region.as_deref(), Some("us-west-2"));

        let (s, found) = parse_profile(Some(CREDS), Some(CONFIG), "sso");
        assert!(found);
        assert_eq!(s.access_key_id, None);
        assert_eq!(s.region.as_deref(), Some("ap-south-1"));

        let (_, found) = parse_profile(Some(CREDS), Some(CONFIG), "nope");
        assert!(!found);
    }

    #[test]
    fn credentials_file_wins_and_debug_redacts() {
        let config = "[profile work]\naws_access_key_id = FROMCONFIG\naws_secret_access_key = s\n";
        let (w, _) = parse_profile(Some(CREDS), Some(config), "work");
        assert_eq!(w.access_key_id.as_deref(), Some("AKIDWORK"));
        let shown = format!("{w:?}");
        assert!(
            !shown.contains("secret=with=equals") && !shown.contains("tok\""),
            "{shown}"
        );
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn load_follows_environment_variables() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::write(&creds, CREDS).unwrap();
        std::fs::write(dir.path().join("cfg"), CONFIG).unwrap();
        let mut vars = HashMap::new();
        vars.insert("HOME", dir.path().to_str().unwrap().to_owned());
        vars.insert(
            "AWS_SHARED_CREDENTIALS_FILE",
            creds.to_str().unwrap().to_owned(),
        );
        vars.insert("AWS_CONFIG_FILE", "~/cfg".to_owned());
        vars.insert("AWS_PROFILE", "work".to_owned());
        let env = |k: &str| vars.get(k).cloned();
        let s = load_profile(&env).unwrap();
        assert_eq!(s.access_key_id.as_deref(), Some("AKIDWORK"));
        assert_eq!(s.region.as_deref(), Some("us-west-2"));

        vars.insert("AWS_PROFILE", "missing".to_owned());
        let env = |k: &str| vars.get(k).cloned();
        assert!(matches!(
            load_profile(&env),
            Err(StoreError::InvalidInput { .. })
        ));

        // No files at all and no explicit profile: nothing, and no error.
        let empty = tempfile::tempdir().unwrap();
        let home = empty.path().to_str().unwrap().to_owned();
        let env = |k: &str| (k == "HOME").then(|| home.clone());
        assert_eq!(load_profile(&env).unwrap(), ProfileSettings::default());

        // Half a key pair is a user error worth a clear message.
        std::fs::write(
            empty.path().join("half"),
            "[default]\naws_access_key_id = X\n",
        )
        .unwrap();
        let half = empty.path().join("half").to_str().unwrap().to_owned();
        let env = |k: &str| match k {
            "HOME" => Some(home.clone()),
            "AWS_SHARED_CREDENTIALS_FILE" => Some(half.clone()),
            _ => None,
        };
        assert!(matches!(
            load_profile(&env),
            Err(StoreError::InvalidInput { .. })
        ));
    }
}
