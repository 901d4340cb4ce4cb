//! `az://container[/prefix]` (or `abfss://container@account.dfs.core.windows.net[/prefix]`): Azure Blob Storage
//! through object_store's Azure client.
//!
//! Why a store of its own kind: teams that keep data in more than one cloud want the same encrypted directory on
//! each. Everything above the `ObjectStore` (the backend, the filesystem, the formats) is shared with S3; only the
//! client differs. Settings come from the standard `AZURE_*` environment variables as object_store reads them
//! (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`, the service principal and
//! managed identity variables, `AZURE_STORAGE_USE_EMULATOR` with `AZURITE_BLOB_STORAGE_URL` for Azurite), and the
//! mount options that mean the same as for S3: `endpoint=` (the blob service URL), `ca_file=`, `timeout=`.
//! Server-side encryption modes are S3 features and are refused before this is reached (`run::open_store`).
//!
//! Attributes go into blob metadata (`x-ms-meta-*`), conditional writes use `If-Match` / `If-None-Match`, which
//! Azure honours; nothing here touches the network.

use std::time::Duration;

use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::RetryConfig;

use super::error::StoreError;
use super::s3::{client_options_from, env_client_options, S3Options};

/// The Azure client for `container`, configured from the environment and `opts`.
pub(super) fn build(
    container: &str,
    account: Option<&str>,
    opts: &S3Options,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MicrosoftAzure, StoreError> {
    let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container);
    // The account an abfs[s]:// URL names wins over AZURE_STORAGE_ACCOUNT_NAME.
    if let Some(account) = account {
        b = b.with_account(account);
    }
    if let Some(endpoint) = &opts.endpoint {
        b = b.with_endpoint(endpoint.clone());
    }
    // Emulator mode (AZURE_STORAGE_USE_EMULATOR) allows plain http on its own: object_store's build() sets it.
    let allow_http = opts.allow_http || opts.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
    // `with_client_options` replaces the client settings `from_env` read: carry the AZURE_* ones over.
    let parse = |k: &str| match k.parse::<AzureConfigKey>() {
        Ok(AzureConfigKey::Client(ck)) => Some(ck),
        _ => None,
    };
    let co = env_client_options("AZURE_", &parse, env);
    let limit: Duration = opts.request_timeout();
    let retry = RetryConfig { retry_timeout: limit, ..RetryConfig::default() };
    let b = b.with_retry(retry).with_client_options(client_options_from(co, allow_http, opts.ca_file.as_ref(), limit)?);
    b.build().map_err(|e| StoreError::invalid(format!("cannot configure Azure Blob Storage access for {container}: {e}")))
}
