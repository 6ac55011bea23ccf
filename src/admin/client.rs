//! The remote admin CLI's side of the HTTPS API (`--api URL --api-key KEY`): one
//! HTTP/1.1 request per connection over rustls, accepting only the certificate whose
//! fingerprint the admin key carries. Small on purpose: the API speaks JSON with a
//! length, and the coordinator closes each connection after its answer.

use std::sync::Arc;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    Admin, AdminError, ApprovalChange, Cleared, CreatedToken, OrgRow, PolicyView, TokenRow,
};
use crate::coord::adminkey::AdminKeyText;
use crate::policy::approve::AdminDevice;

/// Longest answer read (a large organization's device list fits easily).
const MAX_RESPONSE: usize = 32 << 20;
/// A whole request, connection to last byte.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the API is: `https://HOST[:PORT][/]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    pub host: String,
    pub port: u16,
}

impl ApiUrl {
    pub fn parse(url: &str) -> Result<Self, AdminError> {
        let bad = || {
            AdminError::Transport(format!(
                "--api {url:?}: expected https://HOST[:PORT] (e.g. https://coord.example:8443)"
            ))
        };
        let rest = url.trim().strip_prefix("https://").ok_or_else(bad)?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => 443,
                None => return Err(bad()),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (authority.to_string(), 443),
            }
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self { host, port })
    }
}

/// The API as the CLI uses it.
pub struct Remote {
    url: ApiUrl,
    key: String,
    tls: Arc<rustls::ClientConfig>,
    rt: tokio::runtime::Runtime,
}

/// A response: status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Remote {
    pub fn new(url: &str, key: &str) -> Result<Self, AdminError> {
        let url = ApiUrl::parse(url)?;
        let parsed = AdminKeyText::parse(key).map_err(|e| AdminError::Transport(e.to_string()))?;
        let tls = crate::identity::https_client_config(parsed.fingerprint)
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        Ok(Self {
            url,
            key: key.trim().to_string(),
            tls: Arc::new(tls),
            rt,
        })
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, AdminError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        let answer = self
            .rt
            .block_on(async {
                tokio::time::timeout(TIMEOUT, self.request(method, path, body.as_deref())).await
            })
            .map_err(|_| AdminError::Transport("no answer within 30 s".into()))??;
        match answer.status {
            200..=299 => serde_json::from_slice(&answer.body)
                .map_err(|e| AdminError::Transport(format!("unexpected answer: {e}"))),
            401 => Err(AdminError::Unauthorized),
            429 => Err(AdminError::Transport(
                "too many failed attempts from this address; try again in a minute".into(),
            )),
            status => {
                let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
                let err = &v["error"];
                Err(AdminError::Api {
                    status,
                    code: err["code"].as_str().unwrap_or("unknown").into(),
                    message: err["message"]
                        .as_str()
                        .map_or_else(|| format!("HTTP status {status}"), str::to_string),
                })
            }
        }
    }

    /// One request as given (`path` below `/api/v1`, query included; `auth` the whole
    /// `Authorization` value, or none): its status and body. For tests and tools.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), AdminError> {
        let a = self.rt.block_on(async {
            tokio::time::timeout(TIMEOUT, self.send(method, path, auth, Some(body))).await
        });
        let a = a.map_err(|_| AdminError::Transport("no answer within 30 s".into()))??;
        Ok((a.status, a.body))
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, AdminError> {
        let auth = format!("Bearer {}", self.key);
        self.send(method, path, Some(&auth), body).await
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Answer, AdminError> {
        let t = |e: std::io::Error| AdminError::Transport(format!("{}: {e}", self.authority()));
        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(t)?;
        // The name is not what is trusted (the fingerprint is); any valid one will do.
        let name = rustls::pki_types::ServerName::try_from(self.url.host.clone())
            .or_else(|_| rustls::pki_types::ServerName::try_from("nexodus-coordinator"))
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        let mut tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(t)?;
        let body = body.unwrap_or_default();
        let auth = auth.map_or_else(String::new, |a| format!("Authorization: {a}\r\n"));
        let head = format!(
            "{method} /api/v1{path} HTTP/1.1\r\nHost: {}\r\n{auth}\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.authority(),
            body.len()
        );
        // A server may answer (413) and close before reading a large body: read its
        // answer even when writing failed.
        let mut wrote = tls.write_all(head.as_bytes()).await;
        if wrote.is_ok() {
            wrote = tls.write_all(body).await;
        }
        if wrote.is_ok() {
            wrote = tls.flush().await;
        }
        let mut raw = Vec::new();
        let read = (&mut tls)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut raw)
            .await;
        // A server closing without TLS close_notify still sent a whole answer.
        if let Err(e) = read
            && e.kind() != std::io::ErrorKind::UnexpectedEof
        {
            return Err(t(e));
        }
        match (parse_response(&raw), wrote) {
            (Some(a), _) => Ok(a),
            (None, Err(e)) => Err(t(e)),
            (None, Ok(())) => Err(AdminError::Transport(format!(
                "{}: not an HTTP answer",
                self.authority()
            ))),
        }
    }

    fn authority(&self) -> String {
        if self.url.host.contains(':') {
            format!("[{}]:{}", self.url.host, self.url.port)
        } else {
            format!("{}:{}", self.url.host, self.url.port)
        }
    }
}

/// Status and body of an HTTP/1.1 response (Content-Length, chunked, or to the end).
fn parse_response(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (k, v) = line.split_once(':')?;
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        let mut out = Vec::new();
        let mut at = rest;
        loop {
            let nl = at.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&at[..nl]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            at = &at[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(at.get(..size)?);
            at = at.get(size + 2..)?;
        }
        out
    } else {
        match length {
            Some(n) => rest.get(..n)?.to_vec(),
            None => rest.to_vec(),
        }
    };
    Some(Answer { status, body })
}

/// `?org=NAME` (percent-encoded), or nothing.
fn org_query(org: Option<&str>) -> String {
    org.map_or_else(String::new, |o| format!("?org={}", encode(o)))
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const NONE: Option<&()> = None;

impl Admin for Remote {
    fn create_token(
        &mut self,
        org: &str,
        reusable: bool,
        expires_secs: Option<u64>,
    ) -> Result<CreatedToken, AdminError> {
        let body = serde_json::json!({"org": org, "reusable": reusable, "expires": expires_secs});
        self.call("POST", "/tokens", Some(&body))
    }

    fn tokens(&mut self, org: Option<&str>) -> Result<Vec<TokenRow>, AdminError> {
        self.call("GET", &format!("/tokens{}", org_query(org)), NONE)
    }

    fn revoke_token(&mut self, org: Option<&str>, id: i64) -> Result<(), AdminError> {
        let _: serde_json::Value =
            self.call("DELETE", &format!("/tokens/{id}{}", org_query(org)), NONE)?;
        Ok(())
    }

    fn orgs(&mut self) -> Result<Vec<OrgRow>, AdminError> {
        self.call("GET", "/orgs", NONE)
    }

    fn create_org(
        &mut self,
        name: &str,
        cidr: Ipv4Net,
        cidr_v6: Ipv6Net,
        domain: &str,
    ) -> Result<OrgRow, AdminError> {
        let body =
            serde_json::json!({"name": name, "cidr": cidr, "cidr_v6": cidr_v6, "domain": domain});
        self.call("POST", "/orgs", Some(&body))
    }

    fn devices(&mut self, org: &str) -> Result<Vec<AdminDevice>, AdminError> {
        self.call("GET", &format!("/devices{}", org_query(Some(org))), NONE)
    }

    fn remove_device(&mut self, org: Option<&str>, id: i64) -> Result<(), AdminError> {
        let _: serde_json::Value =
            self.call("DELETE", &format!("/devices/{id}{}", org_query(org)), NONE)?;
        Ok(())
    }

    fn change_approval(
        &mut self,
        org: Option<&str>,
        id: i64,
        approve: bool,
        change: &ApprovalChange,
    ) -> Result<AdminDevice, AdminError> {
        let verb = if approve { "approve" } else { "revoke" };
        self.call(
            "POST",
            &format!("/devices/{id}/{verb}{}", org_query(org)),
            Some(change),
        )
    }

    fn policy(&mut self, org: &str) -> Result<PolicyView, AdminError> {
        self.call("GET", &format!("/policy{}", org_query(Some(org))), NONE)
    }

    fn set_policy(&mut self, org: &str, text: &str) -> Result<PolicyView, AdminError> {
        let body = serde_json::json!({ "text": text });
        self.call(
            "PUT",
            &format!("/policy{}", org_query(Some(org))),
            Some(&body),
        )
    }

    fn clear_policy(&mut self, org: &str) -> Result<Cleared, AdminError> {
        self.call("DELETE", &format!("/policy{}", org_query(Some(org))), NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            ApiUrl::parse("https://c:8443/").unwrap(),
            ApiUrl {
                host: "c".into(),
                port: 8443
            }
        );
        assert_eq!(ApiUrl::parse("https://[2001:db8::1]:9").unwrap().port, 9);
        assert_eq!(ApiUrl::parse("https://c").unwrap().port, 443);
        assert!(ApiUrl::parse("http://c:1").is_err());
        assert!(ApiUrl::parse("https://:1").is_err());
    }

    #[test]
    fn responses() {
        let a = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]junk").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"[]"[..]));
        let a = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((a.status, a.body.as_slice()), (404, &b"{}"[..]));
        assert!(parse_response(b"garbage").is_none());
        assert_eq!(encode("a b/é"), "a%20b%2F%C3%A9");
    }
}
