//! The admin API's requests and answers without sockets: [`parse`] turns method, path,
//! query and body (untrusted bytes, bounded by [`MAX_BODY`] before they are read) into
//! a [`Call`]; [`execute`] runs it on the store through [`crate::admin::Local`] and
//! returns the JSON answer or an [`ApiError`] with a stable code.

use std::collections::BTreeMap;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::{Admin, AdminError, ApprovalChange, Local};
use crate::coord::ipam::{default_org_cidr, default_org_cidr_v6};
use crate::store::{DEFAULT_ORG, StoreError};

/// Largest request body read; a larger one is refused (413) unread.
pub const MAX_BODY: usize = 64 << 10;
/// A path report older than this is not shown (nodes report every 30 s).
pub const PATH_REPORT_TTL: i64 = 95;

/// One API request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Devices {
        org: String,
    },
    RemoveDevice {
        org: Option<String>,
        id: i64,
    },
    Approval {
        org: Option<String>,
        id: i64,
        approve: bool,
        change: ApprovalChange,
    },
    CreateToken {
        org: String,
        reusable: bool,
        expires: Option<u64>,
    },
    Tokens {
        org: Option<String>,
    },
    RevokeToken {
        org: Option<String>,
        id: i64,
    },
    Policy {
        org: String,
    },
    SetPolicy {
        org: String,
        text: String,
    },
    ClearPolicy {
        org: String,
    },
    Orgs,
    CreateOrg {
        name: String,
        cidr: Ipv4Net,
        cidr_v6: Ipv6Net,
        domain: String,
    },
}

/// An error answer: HTTP status, a stable machine-readable code, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }

    pub fn too_large() -> Self {
        Self::new(
            413,
            "payload_too_large",
            format!("request bodies are at most {MAX_BODY} bytes"),
        )
    }

    /// `{"error": {"code": …, "message": …}}`.
    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            AdminError::Store(s) => match s {
                StoreError::OrgNotFound(_) => (404, "org_not_found"),
                StoreError::DeviceNotFound(_) => (404, "device_not_found"),
                StoreError::TokenNotFound(_) => (404, "token_not_found"),
                StoreError::KeyNotFound(_) => (404, "not_found"),
                StoreError::OrgExists(_) => (409, "org_exists"),
                StoreError::DuplicateKey(_) | StoreError::Connected { .. } => (409, "conflict"),
                StoreError::Policy(_) => (422, "invalid_policy"),
                StoreError::Invalid(_) | StoreError::Ipam(_) => (422, "invalid"),
                StoreError::InvalidToken
                | StoreError::TokenExpired
                | StoreError::TokenUsed
                | StoreError::Unauthorized => (422, "invalid"),
                StoreError::Sqlite(_)
                | StoreError::Postgres(_)
                | StoreError::Schema(_)
                | StoreError::Corrupt(_)
                | StoreError::Unavailable(_) => {
                    tracing::error!(error = %s, "admin API: store failed");
                    return Self::new(500, "internal", "internal coordinator error");
                }
            },
            AdminError::NotInOrg { .. } | AdminError::Gone(_) => (404, "device_not_found"),
            AdminError::Unsupported(_) => (400, "bad_request"),
            AdminError::Api { .. } | AdminError::Unauthorized | AdminError::Transport(_) => {
                (500, "internal")
            }
        };
        Self::new(status, code, message)
    }
}

/// The query string's `org` (percent-decoded); other keys are refused.
fn query_org(query: Option<&str>) -> Result<Option<String>, ApiError> {
    let mut org = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "org" {
            return Err(ApiError::bad(format!("unknown query parameter {k:?}")));
        }
        if org.is_some() {
            return Err(ApiError::bad("org is given twice"));
        }
        let v = percent_decode(v).ok_or_else(|| ApiError::bad("bad percent-encoding in org"))?;
        if v.is_empty() || v.len() > 64 {
            return Err(ApiError::bad("org is 1 to 64 characters"));
        }
        org = Some(v);
    }
    Ok(org)
}

/// `%XX` and `+` decoded; `None` for bad escapes or text that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn id(segment: &str) -> Result<i64, ApiError> {
    segment
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::new(404, "not_found", format!("no such id {segment:?}")))
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError::too_large());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "malformed_json", format!("request body: {e}")))
}

/// `expires`: seconds (a number) or a lifetime such as "24h"; null or absent: never.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Lifetime {
    Seconds(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    reusable: bool,
    #[serde(default)]
    expires: Option<Lifetime>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgBody {
    name: String,
    #[serde(default)]
    cidr: Option<Ipv4Net>,
    #[serde(default)]
    cidr_v6: Option<Ipv6Net>,
    #[serde(default)]
    domain: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalBody {
    #[serde(default)]
    routes: Vec<ipnet::IpNet>,
    #[serde(default)]
    relay: bool,
    #[serde(default)]
    exit: bool,
}

/// Parses a request below `/api/v1` (`path` starts with `/`).
pub fn parse(method: &str, path: &str, query: Option<&str>, body: &[u8]) -> Result<Call, ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError::too_large());
    }
    let org = query_org(query)?;
    let segments: Vec<&str> = path
        .strip_prefix('/')
        .unwrap_or(path)
        .trim_end_matches('/')
        .split('/')
        .collect();
    let no_body = |call: Call| {
        if body.iter().all(u8::is_ascii_whitespace) {
            Ok(call)
        } else {
            Err(ApiError::bad("this request takes no body"))
        }
    };
    let default = |org: Option<String>| org.unwrap_or_else(|| DEFAULT_ORG.to_string());
    match (method, segments.as_slice()) {
        ("GET", ["devices"]) => no_body(Call::Devices { org: default(org) }),
        ("DELETE", ["devices", n]) => no_body(Call::RemoveDevice { org, id: id(n)? }),
        ("POST", ["devices", n, verb @ ("approve" | "revoke")]) => {
            let b: ApprovalBody = json_body(body)?;
            Ok(Call::Approval {
                org,
                id: id(n)?,
                approve: *verb == "approve",
                change: ApprovalChange {
                    routes: b.routes,
                    relay: b.relay,
                    exit: b.exit,
                },
            })
        }
        ("POST", ["tokens"]) => {
            let b: TokenBody = json_body(body)?;
            let expires = match b.expires {
                None => None,
                Some(Lifetime::Seconds(0)) => {
                    return Err(ApiError::new(
                        422,
                        "invalid",
                        "a token that expires at once could never be used",
                    ));
                }
                Some(Lifetime::Seconds(s)) => Some(s),
                Some(Lifetime::Text(t)) => Some(
                    crate::cli::parse_lifetime(&t)
                        .map_err(|e| ApiError::new(422, "invalid", format!("expires: {e}")))?
                        .as_secs(),
                ),
            };
            Ok(Call::CreateToken {
                org: b.org.or(org).unwrap_or_else(|| DEFAULT_ORG.into()),
                reusable: b.reusable,
                expires,
            })
        }
        ("GET", ["tokens"]) => no_body(Call::Tokens { org }),
        ("DELETE", ["tokens", n]) => no_body(Call::RevokeToken { org, id: id(n)? }),
        ("GET", ["policy"]) => no_body(Call::Policy { org: default(org) }),
        ("PUT", ["policy"]) => {
            let b: PolicyBody = json_body(body)?;
            Ok(Call::SetPolicy {
                org: default(org),
                text: b.text,
            })
        }
        ("DELETE", ["policy"]) => no_body(Call::ClearPolicy { org: default(org) }),
        ("GET", ["orgs"]) => no_body(Call::Orgs),
        ("POST", ["orgs"]) => {
            let b: OrgBody = json_body(body)?;
            Ok(Call::CreateOrg {
                name: b.name,
                cidr: b.cidr.unwrap_or_else(default_org_cidr),
                cidr_v6: b.cidr_v6.unwrap_or_else(default_org_cidr_v6),
                domain: b
                    .domain
                    .unwrap_or_else(|| crate::coord::names::DEFAULT_DOMAIN.to_owned()),
            })
        }
        (
            _,
            ["devices"]
            | ["devices", _]
            | ["devices", _, "approve" | "revoke"]
            | ["tokens"]
            | ["tokens", _]
            | ["policy"]
            | ["orgs"],
        ) => Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::new(404, "not_found", format!("no route {path}"))),
    }
}

/// Runs a call; returns the status and the JSON answer.
pub fn execute(local: &mut Local<'_>, call: Call) -> Result<(u16, Value), ApiError> {
    let to = |v: Result<Value, serde_json::Error>| {
        v.map_err(|e| ApiError::new(500, "internal", e.to_string()))
    };
    Ok(match call {
        Call::Devices { org } => (200, Value::Array(devices(local, &org)?)),
        Call::RemoveDevice { org, id } => {
            local.remove_device(org.as_deref(), id)?;
            (200, json!({ "removed": id }))
        }
        Call::Approval {
            org,
            id,
            approve,
            change,
        } => {
            let d = local.change_approval(org.as_deref(), id, approve, &change)?;
            (200, to(serde_json::to_value(d))?)
        }
        Call::CreateToken {
            org,
            reusable,
            expires,
        } => {
            let t = local.create_token(&org, reusable, expires)?;
            (201, to(serde_json::to_value(t))?)
        }
        Call::Tokens { org } => (
            200,
            to(serde_json::to_value(local.tokens(org.as_deref())?))?,
        ),
        Call::RevokeToken { org, id } => {
            local.revoke_token(org.as_deref(), id)?;
            (200, json!({ "revoked": id }))
        }
        Call::Policy { org } => (200, to(serde_json::to_value(local.policy(&org)?))?),
        Call::SetPolicy { org, text } => (
            200,
            to(serde_json::to_value(local.set_policy(&org, &text)?))?,
        ),
        Call::ClearPolicy { org } => (200, to(serde_json::to_value(local.clear_policy(&org)?))?),
        Call::Orgs => (200, to(serde_json::to_value(local.orgs()?))?),
        Call::CreateOrg {
            name,
            cidr,
            cidr_v6,
            domain,
        } => (
            201,
            to(serde_json::to_value(
                local.create_org(&name, cidr, cidr_v6, &domain)?,
            ))?,
        ),
    })
}

/// `GET /devices`: each device as `devices --json` shows it, plus `name`, `endpoint`
/// and `paths` ({peer hostname: "direct" | "relay"}, from reports of the last
/// [`PATH_REPORT_TTL`] seconds).
fn devices(local: &mut Local<'_>, org: &str) -> Result<Vec<Value>, ApiError> {
    let list = local.devices(org)?;
    let org_id = list.first().map(|d| d.device.organization_id);
    let reports = match org_id {
        Some(id) => local
            .store
            .path_reports(id)
            .map_err(|e| ApiError::from(AdminError::from(e)))?,
        None => Vec::new(),
    };
    let names: BTreeMap<i64, &str> = list
        .iter()
        .map(|d| (d.device.id, d.device.hostname.as_str()))
        .collect();
    let mut paths: BTreeMap<i64, serde_json::Map<String, Value>> = BTreeMap::new();
    for r in reports
        .iter()
        .filter(|r| r.reported_at >= local.now - PATH_REPORT_TTL)
    {
        if let Some(peer) = names.get(&r.peer_id) {
            paths
                .entry(r.device_id)
                .or_default()
                .insert((*peer).to_string(), Value::String(r.path.clone()));
        }
    }
    let mut out = Vec::with_capacity(list.len());
    for d in &list {
        let mut v =
            serde_json::to_value(d).map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
        let endpoint = d
            .device
            .reflexive_endpoint
            .or_else(|| d.device.endpoints.first().copied())
            .map(|e| e.to_string());
        if let Value::Object(m) = &mut v {
            m.insert("name".into(), Value::String(d.device.hostname.clone()));
            m.insert("endpoint".into(), json!(endpoint));
            m.insert(
                "paths".into(),
                Value::Object(paths.remove(&d.device.id).unwrap_or_default()),
            );
        }
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        assert_eq!(
            parse("GET", "/devices", Some("org=a%20b"), b""),
            Ok(Call::Devices { org: "a b".into() })
        );
        assert_eq!(
            parse("DELETE", "/tokens/7", None, b""),
            Ok(Call::RevokeToken { org: None, id: 7 })
        );
        assert_eq!(
            parse(
                "POST",
                "/tokens",
                None,
                br#"{"reusable":true,"expires":"1h"}"#
            ),
            Ok(Call::CreateToken {
                org: "default".into(),
                reusable: true,
                expires: Some(3600)
            })
        );
        assert_eq!(parse("PUT", "/orgs", None, b"").unwrap_err().status, 405);
        assert_eq!(parse("GET", "/nope", None, b"").unwrap_err().status, 404);
        assert_eq!(
            parse("POST", "/tokens", None, b"{").unwrap_err().code,
            "malformed_json"
        );
        assert_eq!(
            parse("POST", "/tokens", None, br#"{"bogus":1}"#)
                .unwrap_err()
                .code,
            "malformed_json"
        );
        assert_eq!(
            parse("POST", "/tokens", None, &vec![b' '; MAX_BODY + 1])
                .unwrap_err()
                .status,
            413
        );
        assert_eq!(
            parse("GET", "/devices", Some("x=1"), b"")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse("DELETE", "/devices/abc", None, b"")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%"), None);
    }

    /// Property: random methods, paths, queries and bodies (built from the pieces
    /// real requests use, mutated) parse to a call or a 4xx, never a panic; a body
    /// over the bound is never accepted. (The fuzz target `api_request` explores
    /// further.)
    #[test]
    fn random_requests_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(24);
        let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
        let segs = [
            "devices", "tokens", "policy", "orgs", "approve", "revoke", "7", "-1", "x", "", "%2F",
        ];
        let bodies: [&[u8]; 7] = [
            b"",
            b"{}",
            br#"{"org":"default","reusable":true,"expires":"1h"}"#,
            br#"{"name":"lab","cidr":"10.0.0.0/8"}"#,
            br#"{"text":"[[allow]]"}"#,
            br#"{"routes":["198.51.100.0/24"],"relay":true}"#,
            b"\xff{",
        ];
        for _ in 0..20_000 {
            let method = methods[rng.random_range(0..methods.len())];
            let n = rng.random_range(0..4);
            let path: String = (0..n)
                .map(|_| format!("/{}", segs[rng.random_range(0..segs.len())]))
                .collect();
            let query = match rng.random_range(0..4) {
                0 => None,
                1 => Some("org=default".to_string()),
                2 => Some(format!("org={}", segs[rng.random_range(0..segs.len())])),
                _ => Some("org=a&org=b%".to_string()),
            };
            let mut body = bodies[rng.random_range(0..bodies.len())].to_vec();
            for _ in 0..rng.random_range(0..3) {
                if !body.is_empty() {
                    let i = rng.random_range(0..body.len());
                    body[i] = rng.random();
                }
            }
            if rng.random_range(0..50) == 0 {
                body.resize(MAX_BODY + 1, b' ');
            }
            match parse(method, &path, query.as_deref(), &body) {
                Ok(_) => assert!(body.len() <= MAX_BODY),
                Err(e) => assert!((400..500).contains(&e.status), "{e:?}"),
            }
        }
    }
}
