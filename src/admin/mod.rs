//! The admin operations (`token`, `org`, `devices`, `policy`), written once behind
//! [`Admin`]: [`Local`] runs them on the store (the coordinator host, and the HTTPS
//! API's handlers), [`client::Remote`] asks the API for them. The CLI renders what
//! either returns with the same code, so local and remote output are the same bytes.
//!
//! No sockets here except in `client`; `Local` is given `now` and randomness.

pub mod client;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::coord::token::{JoinToken, hash_secret};
use crate::policy::approve::AdminDevice;
use crate::store::{Store, StoreError};

#[derive(Debug, Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("device {id} is not in organization {org:?} (see `nexodus devices --org {org}`)")]
    NotInOrg { id: i64, org: String },
    #[error("device {0} is gone")]
    Gone(i64),
    /// What the API answered with an error (its message is the coordinator's).
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the admin API refused the key (missing, wrong or revoked)")]
    Unauthorized,
    #[error("the admin API: {0}")]
    Transport(String),
    #[error("{0}")]
    Unsupported(String),
}

/// A join token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    pub id: i64,
    pub org: String,
    pub reusable: bool,
    pub expires_at: Option<i64>,
    pub uses: i64,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: String,
    pub id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgRow {
    pub id: i64,
    pub name: String,
    pub cidr: Ipv4Net,
    pub cidr_v6: Ipv6Net,
    /// The DNS domain of its devices' names (mesh DNS).
    pub domain: String,
}

/// An organization's policy as `policy show --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub organization: String,
    pub revision: Option<i64>,
    pub updated_at: Option<i64>,
    pub text: Option<String>,
}

/// What `policy clear` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleared {
    pub organization: String,
    pub cleared: bool,
}

/// An approval change: `approve` true for `devices approve`, false for `revoke`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalChange {
    #[serde(default)]
    pub routes: Vec<IpNet>,
    #[serde(default)]
    pub relay: bool,
    #[serde(default)]
    pub exit: bool,
}

/// The admin operations, local or remote.
pub trait Admin {
    fn create_token(
        &mut self,
        org: &str,
        reusable: bool,
        expires_secs: Option<u64>,
    ) -> Result<CreatedToken, AdminError>;
    fn tokens(&mut self, org: Option<&str>) -> Result<Vec<TokenRow>, AdminError>;
    fn revoke_token(&mut self, org: Option<&str>, id: i64) -> Result<(), AdminError>;
    fn orgs(&mut self) -> Result<Vec<OrgRow>, AdminError>;
    fn create_org(
        &mut self,
        name: &str,
        cidr: Ipv4Net,
        cidr_v6: Ipv6Net,
        domain: &str,
    ) -> Result<OrgRow, AdminError>;
    fn devices(&mut self, org: &str) -> Result<Vec<AdminDevice>, AdminError>;
    fn remove_device(&mut self, org: Option<&str>, id: i64) -> Result<(), AdminError>;
    fn change_approval(
        &mut self,
        org: Option<&str>,
        id: i64,
        approve: bool,
        change: &ApprovalChange,
    ) -> Result<AdminDevice, AdminError>;
    fn policy(&mut self, org: &str) -> Result<PolicyView, AdminError>;
    fn set_policy(&mut self, org: &str, text: &str) -> Result<PolicyView, AdminError>;
    fn clear_policy(&mut self, org: &str) -> Result<Cleared, AdminError>;
}

/// The operations on a store: the coordinator host's CLI and the API's handlers.
pub struct Local<'a> {
    pub store: &'a mut dyn Store,
    /// What join tokens carry: the coordinator's certificate fingerprint.
    pub fingerprint: [u8; 32],
    pub now: i64,
    /// Secrets of new tokens.
    pub random: &'a mut dyn FnMut() -> [u8; 32],
}

impl Local<'_> {
    fn org_id(&mut self, org: Option<&str>) -> Result<Option<i64>, AdminError> {
        Ok(org
            .map(|name| self.store.org_by_name(name).map(|o| o.id))
            .transpose()?)
    }

    fn not_in_org(e: StoreError, id: i64, org: Option<&str>) -> AdminError {
        match (e, org) {
            (StoreError::DeviceNotFound(_), Some(name)) => AdminError::NotInOrg {
                id,
                org: name.into(),
            },
            (e, _) => e.into(),
        }
    }
}

impl Admin for Local<'_> {
    fn create_token(
        &mut self,
        org: &str,
        reusable: bool,
        expires_secs: Option<u64>,
    ) -> Result<CreatedToken, AdminError> {
        let org = self.store.org_by_name(org)?;
        let token = JoinToken {
            fingerprint: self.fingerprint,
            secret: (self.random)(),
        };
        let expires = expires_secs.map(|t| {
            self.now
                .saturating_add(i64::try_from(t).unwrap_or(i64::MAX))
        });
        let id = self.store.create_token(
            org.id,
            &hash_secret(&token.secret_text()),
            reusable,
            expires,
            self.now,
        )?;
        Ok(CreatedToken {
            token: token.to_string(),
            id,
        })
    }

    fn tokens(&mut self, org: Option<&str>) -> Result<Vec<TokenRow>, AdminError> {
        let org_id = self.org_id(org)?;
        let names: std::collections::HashMap<i64, String> = self
            .store
            .orgs()?
            .into_iter()
            .map(|o| (o.id, o.name))
            .collect();
        Ok(self
            .store
            .tokens(org_id)?
            .into_iter()
            .map(|t| TokenRow {
                id: t.id,
                org: names.get(&t.organization_id).cloned().unwrap_or_default(),
                reusable: t.reusable,
                expires_at: t.expires_at,
                uses: t.uses,
                created_at: t.created_at,
            })
            .collect())
    }

    fn revoke_token(&mut self, org: Option<&str>, id: i64) -> Result<(), AdminError> {
        let org_id = self.org_id(org)?;
        Ok(self.store.revoke_token(org_id, id)?)
    }

    fn orgs(&mut self) -> Result<Vec<OrgRow>, AdminError> {
        Ok(self.store.orgs()?.into_iter().map(org_row).collect())
    }

    fn create_org(
        &mut self,
        name: &str,
        cidr: Ipv4Net,
        cidr_v6: Ipv6Net,
        domain: &str,
    ) -> Result<OrgRow, AdminError> {
        Ok(org_row(
            self.store
                .create_org_in(name, cidr, cidr_v6, domain, self.now)?,
        ))
    }

    fn devices(&mut self, org: &str) -> Result<Vec<AdminDevice>, AdminError> {
        let org = self.store.org_by_name(org)?;
        Ok(self.store.admin_devices(org.id)?)
    }

    fn remove_device(&mut self, org: Option<&str>, id: i64) -> Result<(), AdminError> {
        if let Some(name) = org {
            let org = self.store.org_by_name(name)?;
            if !self.store.devices(org.id)?.iter().any(|d| d.id == id) {
                return Err(AdminError::NotInOrg {
                    id,
                    org: name.into(),
                });
            }
        }
        Ok(self.store.remove_device(id, self.now)?)
    }

    fn change_approval(
        &mut self,
        org: Option<&str>,
        id: i64,
        approve: bool,
        c: &ApprovalChange,
    ) -> Result<AdminDevice, AdminError> {
        let org_id = self.org_id(org)?;
        let changed = if approve {
            self.store
                .approve(org_id, id, &c.routes, c.relay, c.exit, self.now)
        } else {
            self.store
                .revoke(org_id, id, &c.routes, c.relay, c.exit, self.now)
        };
        let d = changed.map_err(|e| Self::not_in_org(e, id, org))?;
        self.store
            .admin_devices(d.organization_id)?
            .into_iter()
            .find(|a| a.device.id == id)
            .ok_or(AdminError::Gone(id))
    }

    fn policy(&mut self, org: &str) -> Result<PolicyView, AdminError> {
        let org = self.store.org_by_name(org)?;
        let p = self.store.policy(org.id)?;
        Ok(PolicyView {
            organization: org.name,
            revision: p.as_ref().map(|p| p.revision),
            updated_at: p.as_ref().map(|p| p.updated_at),
            text: p.map(|p| p.text),
        })
    }

    fn set_policy(&mut self, org: &str, text: &str) -> Result<PolicyView, AdminError> {
        let org = self.store.org_by_name(org)?;
        let revision = self.store.set_policy(org.id, text, self.now)?;
        Ok(PolicyView {
            organization: org.name,
            revision: Some(revision),
            updated_at: Some(self.now),
            text: Some(text.into()),
        })
    }

    fn clear_policy(&mut self, org: &str) -> Result<Cleared, AdminError> {
        let org = self.store.org_by_name(org)?;
        let cleared = self.store.clear_policy(org.id, self.now)?;
        Ok(Cleared {
            organization: org.name,
            cleared,
        })
    }
}

fn org_row(o: crate::store::Organization) -> OrgRow {
    OrgRow {
        id: o.id,
        name: o.name,
        cidr: o.ip_cidr,
        cidr_v6: o.ip_cidr_v6,
        domain: o.domain,
    }
}

/// [`Local`] on the coordinator state an admin command opened (on the coordinator
/// host), with the process clock and RNG.
pub struct OnHost {
    pub state: crate::serve::CoordinatorState,
}

impl OnHost {
    fn with<T>(&mut self, f: impl FnOnce(&mut Local<'_>) -> T) -> T {
        let mut random = || {
            let mut b = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
            b
        };
        let mut local = Local {
            store: self.state.store.as_mut(),
            fingerprint: self.state.identity.fingerprint(),
            now: crate::serve::unix_now(),
            random: &mut random,
        };
        f(&mut local)
    }
}

impl Admin for OnHost {
    fn create_token(
        &mut self,
        org: &str,
        reusable: bool,
        expires_secs: Option<u64>,
    ) -> Result<CreatedToken, AdminError> {
        self.with(|l| l.create_token(org, reusable, expires_secs))
    }
    fn tokens(&mut self, org: Option<&str>) -> Result<Vec<TokenRow>, AdminError> {
        self.with(|l| l.tokens(org))
    }
    fn revoke_token(&mut self, org: Option<&str>, id: i64) -> Result<(), AdminError> {
        self.with(|l| l.revoke_token(org, id))
    }
    fn orgs(&mut self) -> Result<Vec<OrgRow>, AdminError> {
        self.with(|l| l.orgs())
    }
    fn create_org(
        &mut self,
        name: &str,
        cidr: Ipv4Net,
        cidr_v6: Ipv6Net,
        domain: &str,
    ) -> Result<OrgRow, AdminError> {
        self.with(|l| l.create_org(name, cidr, cidr_v6, domain))
    }
    fn devices(&mut self, org: &str) -> Result<Vec<AdminDevice>, AdminError> {
        self.with(|l| l.devices(org))
    }
    fn remove_device(&mut self, org: Option<&str>, id: i64) -> Result<(), AdminError> {
        self.with(|l| l.remove_device(org, id))
    }
    fn change_approval(
        &mut self,
        org: Option<&str>,
        id: i64,
        approve: bool,
        change: &ApprovalChange,
    ) -> Result<AdminDevice, AdminError> {
        self.with(|l| l.change_approval(org, id, approve, change))
    }
    fn policy(&mut self, org: &str) -> Result<PolicyView, AdminError> {
        self.with(|l| l.policy(org))
    }
    fn set_policy(&mut self, org: &str, text: &str) -> Result<PolicyView, AdminError> {
        self.with(|l| l.set_policy(org, text))
    }
    fn clear_policy(&mut self, org: &str) -> Result<Cleared, AdminError> {
        self.with(|l| l.clear_policy(org))
    }
}

/// A unix time as `2026-12-03T01:44:35Z`.
pub fn format_time(t: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(t).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `token list` as a table.
pub fn render_tokens(tokens: &[TokenRow], now: i64) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<6} {:<20} {:<9} {:<5} {:<21} CREATED\n",
        "ID", "ORG", "REUSABLE", "USES", "EXPIRES"
    );
    for t in tokens {
        let expires = match t.expires_at {
            None => "never".to_string(),
            Some(e) if e <= now => format!("expired {}", format_time(e)),
            Some(e) => format_time(e),
        };
        let _ = writeln!(
            out,
            "{:<6} {:<20} {:<9} {:<5} {:<21} {}",
            t.id,
            t.org,
            if t.reusable { "yes" } else { "no" },
            t.uses,
            expires,
            format_time(t.created_at)
        );
    }
    out
}

/// `org list` as a table.
pub fn render_orgs(orgs: &[OrgRow]) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<6} {:<20} {:<18} {:<24} DOMAIN\n",
        "ID", "NAME", "CIDR", "CIDR V6"
    );
    for o in orgs {
        let _ = writeln!(
            out,
            "{:<6} {:<20} {:<18} {:<24} {}",
            o.id,
            o.name,
            o.cidr.to_string(),
            o.cidr_v6.to_string(),
            o.domain
        );
    }
    out
}
