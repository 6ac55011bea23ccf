//! The records the [`super::Store`] interface speaks in: organizations, the change
//! log, policies, join tokens, admin keys, path reports, registrations and presence.

use ipnet::{Ipv4Net, Ipv6Net};

use crate::wire::control::{Device, RegisterRequest};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    pub id: i64,
    pub name: String,
    pub ip_cidr: Ipv4Net,
    pub ip_cidr_v6: Ipv6Net,
    /// DNS domain of its devices' names (DESIGN §10).
    pub domain: String,
}

/// One entry of the change log with the device's state now (`None`: removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: i64,
    pub organization_id: i64,
    pub device_id: i64,
    pub device: Option<Device>,
}

/// One entry of the change log, without the device: what a coordinator reads at start
/// to know which revisions changed more than a device's online flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    pub revision: i64,
    pub organization_id: i64,
    /// [`POLICY_CHANGE_ID`] for a change of the organization's policy.
    pub device_id: i64,
    pub removed: bool,
}

/// An organization's policy file as stored (it validated when it was set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub organization_id: i64,
    pub text: String,
    /// 1 for the first `policy set`, one more for each `policy set` or `policy
    /// clear` after it.
    pub revision: i64,
    pub updated_at: i64,
}

/// A join token as `nexodus token list` shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenInfo {
    pub id: i64,
    pub organization_id: i64,
    pub reusable: bool,
    pub expires_at: Option<i64>,
    pub uses: i64,
    pub created_at: i64,
}

/// An admin key of the HTTPS API, by the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminKey {
    pub id: i64,
    pub name: String,
    pub secret_hash: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// A device's last report on its path to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathReport {
    pub device_id: i64,
    pub peer_id: i64,
    /// "direct" or "relay".
    pub path: String,
    pub handshake_age: Option<i64>,
    pub reported_at: i64,
}

/// One registration of a batch (see [`Store::register_devices`]).
#[derive(Debug, Clone, Copy)]
pub struct Registration<'a> {
    pub req: &'a RegisterRequest,
    pub token_hash: &'a str,
    pub credential_hash: &'a str,
}

/// One item of a presence batch (see [`Store::presence`]).
#[derive(Debug, Clone, Copy)]
pub enum Presence<'a> {
    /// A reconnect: as [`Store::login`].
    Login {
        device_id: i64,
        credential_hash: &'a str,
        ipv6_supported: Option<bool>,
        /// The node process (see [`Store::claim_watch`]): refused with
        /// [`StoreError::Connected`] while another process of this device holds a
        /// watch stream through another live coordinator.
        instance: Option<u64>,
    },
    /// A watch stream began or ended: as [`Store::set_online`].
    Online { device_id: i64, online: bool },
    /// A watch stream begins: as [`Store::claim_watch`].
    Watch {
        device_id: i64,
        instance: Option<u64>,
        remote: &'a str,
    },
}
