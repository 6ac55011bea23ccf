//! Forwarding rules of rootless mode, parsed and checked before anything starts.
//!
//! - ingress `PROTO:PORT:HOST:HOSTPORT`: connections (or datagrams) to this node's mesh
//!   addresses on `PORT` go to `HOST:HOSTPORT` on this host;
//! - egress `PROTO:[BIND:]LOCALPORT:MESHHOST:PORT`: a local listener on
//!   `BIND:LOCALPORT` (default 127.0.0.1) carries connections to `MESHHOST:PORT`.
//!
//! IPv6 addresses are written in brackets (`[200::5]`). Pure: no sockets, no binding
//! (the shell binds and reports ports already in use).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Transport protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// Where a rule carries traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the mesh to a local service.
    Ingress,
    /// From a local listener to the mesh.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub direction: Direction,
    pub proto: Proto,
    /// Ingress: the mesh-side port (address unspecified: both mesh addresses).
    /// Egress: the local listener.
    pub listen: SocketAddr,
    /// Ingress: the local service. Egress: the mesh host (unspecified while a named
    /// host does not resolve).
    pub target: SocketAddr,
    /// Egress to a mesh name (`NAME.DOMAIN`, lower-case): resolved from the mesh DNS
    /// table whenever it changes.
    pub target_name: Option<String>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.direction {
            Direction::Ingress => write!(
                f,
                "ingress {}:{}:{}",
                self.proto,
                self.listen.port(),
                self.target
            ),
            Direction::Egress => {
                write!(f, "egress {}:", self.proto)?;
                if self.listen.ip() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
                    match self.listen.ip() {
                        IpAddr::V4(a) => write!(f, "{a}:")?,
                        IpAddr::V6(a) => write!(f, "[{a}]:")?,
                    }
                }
                match &self.target_name {
                    Some(name) => write!(f, "{}:{name}:{}", self.listen.port(), self.target.port()),
                    None => write!(f, "{}:{}", self.listen.port(), self.target),
                }
            }
        }
    }
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("unknown protocol {0:?} (expected tcp or udp)")]
    UnknownProtocol(String),
    #[error("bad port {0:?} (expected 1-65535)")]
    BadPort(String),
    #[error("bad address {0:?} (expected an IPv4 address or an IPv6 address in brackets)")]
    BadAddress(String),
    #[error("cannot use {0} as a {1} address")]
    UnusableAddress(IpAddr, &'static str),
    #[error("expected {0}")]
    Shape(&'static str),
    #[error("{proto} port {port} is already used by rule {other:?}")]
    PortInUse {
        proto: Proto,
        port: u16,
        other: String,
    },
}

const INGRESS_SHAPE: &str = "PROTO:PORT:HOST:HOSTPORT, e.g. tcp:443:127.0.0.1:8443";
const EGRESS_SHAPE: &str = "PROTO:[BIND:]LOCALPORT:MESHHOST:PORT, e.g. tcp:5432:100.64.0.5:5432, \
     udp:5353:[200::5]:53 or tcp:5432:db.nexodus.internal:5432";

/// Splits `a:b:[v6]:c` into fields, keeping bracketed IPv6 addresses whole (brackets
/// stripped, flagged).
fn fields(s: &str) -> Option<Vec<(&str, bool)>> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        if let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']')?;
            let (addr, after) = inner.split_at(end);
            out.push((addr, true));
            let after = after.get(1..)?;
            if after.is_empty() {
                return Some(out);
            }
            rest = after.strip_prefix(':')?;
        } else {
            match rest.find(':') {
                Some(i) => {
                    let (f, after) = rest.split_at(i);
                    out.push((f, false));
                    rest = after.get(1..)?;
                }
                None => {
                    out.push((rest, false));
                    return Some(out);
                }
            }
        }
    }
}

fn port(s: &str) -> Result<u16, RuleError> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 && !s.starts_with('+') => Ok(p),
        _ => Err(RuleError::BadPort(s.into())),
    }
}

fn address((s, bracketed): (&str, bool)) -> Result<IpAddr, RuleError> {
    let ip = if bracketed {
        s.parse::<std::net::Ipv6Addr>().map(IpAddr::V6)
    } else {
        s.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map_err(|_| {
        RuleError::BadAddress(if bracketed {
            format!("[{s}]")
        } else {
            s.into()
        })
    })
}

fn proto(s: &str) -> Result<Proto, RuleError> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        _ => Err(RuleError::UnknownProtocol(s.into())),
    }
}

/// A rule of the wrong shape: an unknown protocol in front says so first (`tcpx:1:2`),
/// otherwise the expected `shape`.
fn shape_error(f: &[(&str, bool)], shape: &'static str) -> RuleError {
    match f {
        [(p, false), _, ..] => proto(p).err().unwrap_or(RuleError::Shape(shape)),
        _ => RuleError::Shape(shape),
    }
}

/// The `HOST:PORT` a rule sends to (`what`, in errors).
fn target(
    host: (&str, bool),
    host_port: &str,
    what: &'static str,
) -> Result<SocketAddr, RuleError> {
    let host = address(host)?;
    let host_port = port(host_port)?;
    check_target(host, what)?;
    Ok(SocketAddr::new(host, host_port))
}

/// A unicast address something can be sent to.
fn check_target(ip: IpAddr, what: &'static str) -> Result<(), RuleError> {
    let bad =
        ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v) if v.is_broadcast());
    if bad {
        return Err(RuleError::UnusableAddress(ip, what));
    }
    Ok(())
}

/// A mesh host given by name (`NAME.DOMAIN`: DNS labels, at least one dot, not an
/// IPv4 address), lower-cased.
fn mesh_name((s, bracketed): (&str, bool)) -> Option<String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let ok = !bracketed
        && name.parse::<Ipv4Addr>().is_err()
        && name.contains('.')
        && name.len() <= 253
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    ok.then_some(name)
}

impl Rule {
    /// Parses `--ingress PROTO:PORT:HOST:HOSTPORT`.
    pub fn ingress(s: &str) -> Result<Self, RuleError> {
        let f = fields(s.trim()).ok_or(RuleError::Shape(INGRESS_SHAPE))?;
        let [(p, false), (mesh_port, false), host, (host_port, false)] = f[..] else {
            return Err(shape_error(&f, INGRESS_SHAPE));
        };
        let proto = proto(p)?;
        let mesh_port = port(mesh_port)?;
        let target = target(host, host_port, "local target")?;
        Ok(Self {
            direction: Direction::Ingress,
            proto,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), mesh_port),
            target,
            target_name: None,
        })
    }

    /// Parses `--egress PROTO:[BIND:]LOCALPORT:MESHHOST:PORT`.
    pub fn egress(s: &str) -> Result<Self, RuleError> {
        let f = fields(s.trim()).ok_or(RuleError::Shape(EGRESS_SHAPE))?;
        let (p, bind, local_port, host, host_port) = match f[..] {
            [(p, false), (lp, false), host, (hp, false)] => (p, None, lp, host, hp),
            [(p, false), bind, (lp, false), host, (hp, false)] => (p, Some(bind), lp, host, hp),
            _ => return Err(shape_error(&f, EGRESS_SHAPE)),
        };
        let proto = proto(p)?;
        let bind = bind
            .map(address)
            .transpose()?
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        if bind.is_multicast() {
            return Err(RuleError::UnusableAddress(bind, "listen"));
        }
        let local_port = port(local_port)?;
        let (target, target_name) = match mesh_name(host) {
            Some(name) => (
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port(host_port)?),
                Some(name),
            ),
            None => (target(host, host_port, "mesh host")?, None),
        };
        Ok(Self {
            direction: Direction::Egress,
            proto,
            listen: SocketAddr::new(bind, local_port),
            target,
            target_name,
        })
    }
}

/// Refuses two rules that would listen on the same port: two ingress rules on one
/// mesh port, or two egress rules on one local port and protocol (whatever the bind
/// address: the kernel would refuse most of those combinations anyway, and the error
/// is clearer here).
pub fn check_conflicts(rules: &[Rule]) -> Result<(), Box<(Rule, RuleError)>> {
    for (i, a) in rules.iter().enumerate() {
        for b in rules.iter().take(i) {
            if a.direction == b.direction
                && a.proto == b.proto
                && a.listen.port() == b.listen.port()
            {
                return Err(Box::new((
                    a.clone(),
                    RuleError::PortInUse {
                        proto: a.proto,
                        port: a.listen.port(),
                        other: b.to_string(),
                    },
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ingress_rules_parse() {
        let r = Rule::ingress("tcp:443:127.0.0.1:8443").unwrap();
        assert_eq!(r.proto, Proto::Tcp);
        assert_eq!(r.listen.port(), 443);
        assert_eq!(r.target, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(r.to_string(), "ingress tcp:443:127.0.0.1:8443");
        let r = Rule::ingress("UDP:53:[::1]:5353").unwrap();
        assert_eq!(r.proto, Proto::Udp);
        assert_eq!(r.target, "[::1]:5353".parse().unwrap());
        assert_eq!(r.to_string(), "ingress udp:53:[::1]:5353");
    }

    #[test]
    fn egress_rules_parse() {
        let r = Rule::egress("tcp:5432:100.64.0.5:5432").unwrap();
        assert_eq!(r.listen, "127.0.0.1:5432".parse().unwrap());
        assert_eq!(r.target, "100.64.0.5:5432".parse().unwrap());
        assert_eq!(r.to_string(), "egress tcp:5432:100.64.0.5:5432");
        let r = Rule::egress("tcp:5433:[200::5]:5432").unwrap();
        assert_eq!(r.target, "[200::5]:5432".parse().unwrap());
        let r = Rule::egress("udp:[::1]:5353:[200::5]:53").unwrap();
        assert_eq!(r.listen, "[::1]:5353".parse().unwrap());
        assert_eq!(r.to_string(), "egress udp:[::1]:5353:[200::5]:53");
        let r = Rule::egress("tcp:0.0.0.0:80:100.64.0.9:80").unwrap();
        assert_eq!(r.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(r.target_name, None);
        // A mesh name: resolved later, from the mesh DNS table.
        let r = Rule::egress("tcp:8080:Web.Nexodus.Internal.:80").unwrap();
        assert_eq!(r.target_name.as_deref(), Some("web.nexodus.internal"));
        assert_eq!(r.target, "0.0.0.0:80".parse().unwrap());
        assert_eq!(r.to_string(), "egress tcp:8080:web.nexodus.internal:80");
        assert!(Rule::egress("udp:[::1]:53:dns.corp.example:53").is_ok());
        for bad in [
            "tcp:1:localhost:2",
            "tcp:1:a..b:2",
            "tcp:1:a_b.c:2",
            "tcp:1:10.0.0:2",
        ] {
            assert!(Rule::egress(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_rules_say_why() {
        use RuleError::*;
        let cases: &[(&str, RuleError)] = &[
            ("sctp:1:127.0.0.1:2", UnknownProtocol("sctp".into())),
            ("sctp:1", UnknownProtocol("sctp".into())),
            ("tcp:0:127.0.0.1:2", BadPort("0".into())),
            ("tcp:65536:127.0.0.1:2", BadPort("65536".into())),
            ("tcp:x:127.0.0.1:2", BadPort("x".into())),
            ("tcp:+80:127.0.0.1:2", BadPort("+80".into())),
            ("tcp:80:127.0.0.1:", BadPort("".into())),
            ("tcp:80:127.0.0:2", BadAddress("127.0.0".into())),
            ("tcp:80:localhost:2", BadAddress("localhost".into())),
            ("tcp:80:[zz::1]:2", BadAddress("[zz::1]".into())),
            ("tcp:80:[127.0.0.1]:2", BadAddress("[127.0.0.1]".into())),
            (
                "tcp:80:0.0.0.0:2",
                UnusableAddress("0.0.0.0".parse().unwrap(), "local target"),
            ),
            ("tcp:80:127.0.0.1", Shape(INGRESS_SHAPE)),
            ("tcp:80:::1:2", Shape(INGRESS_SHAPE)),
            ("tcp:80:[::1:2", Shape(INGRESS_SHAPE)),
            ("tcp:80:[::1]x:2", Shape(INGRESS_SHAPE)),
            ("", Shape(INGRESS_SHAPE)),
            ("8080", Shape(INGRESS_SHAPE)),
        ];
        for (rule, want) in cases {
            assert_eq!(Rule::ingress(rule).unwrap_err(), *want, "{rule}");
        }
        assert_eq!(
            Rule::egress("tcp:80:224.0.0.1:80").unwrap_err(),
            UnusableAddress("224.0.0.1".parse().unwrap(), "mesh host")
        );
        assert_eq!(
            Rule::egress("tcp:80:[::]:80").unwrap_err(),
            UnusableAddress("::".parse().unwrap(), "mesh host")
        );
        assert_eq!(
            Rule::egress("icmp:80:100.64.0.1:80").unwrap_err(),
            UnknownProtocol("icmp".into())
        );
        assert_eq!(
            Rule::egress("tcp:1:2:3:4:5:6").unwrap_err(),
            Shape(EGRESS_SHAPE)
        );
    }

    #[test]
    fn conflicts_are_found() {
        let rules = [
            Rule::ingress("tcp:80:127.0.0.1:8080").unwrap(),
            Rule::ingress("udp:80:127.0.0.1:8080").unwrap(),
            Rule::egress("tcp:80:100.64.0.1:80").unwrap(),
        ];
        assert!(check_conflicts(&rules).is_ok());
        let mut more = rules.to_vec();
        more.push(Rule::ingress("tcp:80:127.0.0.1:9090").unwrap());
        let (rule, err) = *check_conflicts(&more).unwrap_err();
        assert_eq!(rule.target.port(), 9090);
        assert!(
            err.to_string()
                .contains("tcp port 80 is already used by rule \"ingress tcp:80:127.0.0.1:8080\""),
            "{err}"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let alphabet = b"tcpud:[]0123456789.:af";
        let mut state = 0x1234_5678_u32;
        for _ in 0..20_000 {
            let len = (state % 24) as usize;
            let s: String = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    alphabet[(state as usize) % alphabet.len()] as char
                })
                .collect();
            let _ = Rule::ingress(&s);
            let _ = Rule::egress(&s);
        }
    }
}
