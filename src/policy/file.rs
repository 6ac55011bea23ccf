//! The policy file (DESIGN §7 and §13): parsing and validation, nothing else.
//!
//! A file either validates whole or is refused with an error naming the rule; the
//! coordinator stores only files that validated, so everything downstream (the
//! compiler, approval) works on a [`Policy`] that is known to be well formed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

/// Why a policy file was refused. Every variant names where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("not a valid policy file: {0}")]
    Toml(String),
    #[error("{at}: unknown group `{name}` (groups are defined under [groups])")]
    UnknownGroup { at: String, name: String },
    #[error("{at}: `{text}` is not a CIDR: {reason}")]
    BadCidr {
        at: String,
        text: String,
        reason: String,
    },
    #[error("{at}: `{text}` is not a hostname glob: {reason}")]
    BadGlob {
        at: String,
        text: String,
        reason: String,
    },
    #[error(
        "{at}: `{text}` is not a port or a range of ports (1-65535, e.g. \"22\" or \"8000-8099\")"
    )]
    BadPort { at: String, text: String },
    #[error("{at}: unknown proto `{text}` (tcp, udp, icmp, any, or a protocol number 0-255)")]
    BadProto { at: String, text: String },
    #[error("{at}: ports apply only to tcp and udp, not to proto `{proto}`")]
    PortsWithoutPorts { at: String, proto: String },
    #[error("{at}: `{field}` must list at least one entry")]
    Empty { at: String, field: &'static str },
    #[error("{at}: `internet` is a destination: use it in `to`, not in `from`")]
    InternetAsSource { at: String },
    #[error("group `{name}`: {reason}")]
    BadGroup { name: String, reason: String },
}

/// A validated policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Group name → hostname globs.
    pub groups: BTreeMap<String, Vec<HostGlob>>,
    /// The `[[allow]]` rules, in file order (rule 1 is the first).
    pub allow: Vec<AllowRule>,
    /// The `[approve]` section: claims approved in advance.
    pub approve: Approve,
}

/// One `[[allow]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub from: Vec<Selector>,
    pub to: Vec<Selector>,
    pub proto: Proto,
    /// Empty: every port (or the protocol has none).
    pub ports: Vec<PortRange>,
}

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `*`: every device (v4 and v6 addresses) and, as a source, every address.
    Any,
    /// `group:NAME`, NAME defined under `[groups]`.
    Group(String),
    /// A hostname glob: the matching devices' v4 and v6 addresses.
    Host(HostGlob),
    /// A CIDR: its own family only (`0.0.0.0/0` never matches IPv6).
    Cidr(IpNet),
    /// `internet` (a `to`): destinations outside the organization, reached through
    /// an exit node (DESIGN §8), both families.
    Internet,
}

/// `proto` of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    /// ICMP for v4 and ICMPv6 for v6.
    Icmp,
    /// An IP protocol number (next header for v6), taken literally in both families.
    Number(u8),
}

impl Proto {
    /// Whether `ports` may be given with this protocol: tcp, udp, or any (which then
    /// means tcp and udp on those ports, as other protocols have no ports).
    pub fn has_ports(self) -> bool {
        matches!(
            self,
            Proto::Any | Proto::Tcp | Proto::Udp | Proto::Number(6) | Proto::Number(17)
        )
    }
}

/// An inclusive port range; a single port is `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// A hostname glob (`*`, `?`, `[abc]`), matched case-insensitively as hostnames are.
#[derive(Debug, Clone)]
pub struct HostGlob {
    text: String,
    pattern: glob::Pattern,
}

impl HostGlob {
    pub fn new(text: &str) -> Result<Self, glob::PatternError> {
        let pattern = glob::Pattern::new(text)?;
        Ok(Self {
            text: text.to_string(),
            pattern,
        })
    }

    pub fn matches(&self, hostname: &str) -> bool {
        let options = glob::MatchOptions {
            case_sensitive: false,
            require_literal_separator: false,
            require_literal_leading_dot: false,
        };
        self.pattern.matches_with(hostname, options)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for HostGlob {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for HostGlob {}

/// The `[approve]` section (DESIGN §13): claims that take effect without an admin's
/// `devices approve`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Approve {
    pub routes: Vec<RouteApproval>,
    pub relay: Vec<HostGlob>,
    pub exit: Vec<HostGlob>,
}

/// `{ cidr = "198.51.100.0/24", by = ["router*"] }`: devices whose hostname matches
/// `by` may advertise `cidr` or any prefix inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteApproval {
    pub cidr: IpNet,
    pub by: Vec<HostGlob>,
}

impl Approve {
    /// Whether the policy approves `prefix` advertised by the device `hostname`.
    pub fn approves_route(&self, hostname: &str, prefix: &IpNet) -> bool {
        self.routes
            .iter()
            .any(|r| r.cidr.contains(prefix) && r.by.iter().any(|glob| glob.matches(hostname)))
    }

    /// Whether the policy approves the relay role for `hostname`.
    pub fn approves_relay(&self, hostname: &str) -> bool {
        self.relay.iter().any(|glob| glob.matches(hostname))
    }

    /// Whether the policy approves the exit role for `hostname`.
    pub fn approves_exit(&self, hostname: &str) -> bool {
        self.exit.iter().any(|glob| glob.matches(hostname))
    }
}

// ---- the file as written (serde), before validation ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    allow: Vec<RawAllow>,
    #[serde(default)]
    approve: RawApprove,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    from: Vec<String>,
    to: Vec<String>,
    #[serde(default)]
    proto: Option<RawProto>,
    #[serde(default)]
    ports: Vec<RawPort>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawProto {
    Name(String),
    Number(i64),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Text(String),
    Number(i64),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApprove {
    #[serde(default)]
    routes: Vec<RawRouteApproval>,
    #[serde(default)]
    relay: Vec<String>,
    #[serde(default)]
    exit: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteApproval {
    cidr: String,
    by: Vec<String>,
}

impl Policy {
    /// Parses and validates a policy file; the error names the rule at fault.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| PolicyError::Toml(e.to_string()))?;
        let mut groups = BTreeMap::new();
        for (name, members) in raw.groups {
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
                return Err(PolicyError::BadGroup {
                    name,
                    reason: "a group name may not be empty or hold spaces or `:`".into(),
                });
            }
            let at = format!("group `{name}`");
            let globs = members
                .iter()
                .map(|m| glob(&at, m))
                .collect::<Result<Vec<_>, _>>()?;
            groups.insert(name, globs);
        }
        let mut allow = Vec::with_capacity(raw.allow.len());
        for (i, rule) in raw.allow.into_iter().enumerate() {
            let at = format!("allow rule {}", i + 1);
            allow.push(allow_rule(&at, rule, &groups)?);
        }
        let approve = approve_section(raw.approve)?;
        Ok(Policy {
            groups,
            allow,
            approve,
        })
    }
}

fn allow_rule(
    at: &str,
    rule: RawAllow,
    groups: &BTreeMap<String, Vec<HostGlob>>,
) -> Result<AllowRule, PolicyError> {
    let from = selectors(at, "from", &rule.from, groups)?;
    let to = selectors(at, "to", &rule.to, groups)?;
    let proto = match rule.proto {
        None => Proto::Any,
        Some(p) => proto(at, p)?,
    };
    let mut ports = Vec::with_capacity(rule.ports.len());
    for p in &rule.ports {
        ports.push(port_range(at, p)?);
    }
    if !ports.is_empty() && !proto.has_ports() {
        return Err(PolicyError::PortsWithoutPorts {
            at: at.to_string(),
            proto: proto_name(proto),
        });
    }
    ports.sort();
    Ok(AllowRule {
        from,
        to,
        proto,
        ports,
    })
}

fn selectors(
    at: &str,
    field: &'static str,
    items: &[String],
    groups: &BTreeMap<String, Vec<HostGlob>>,
) -> Result<Vec<Selector>, PolicyError> {
    if items.is_empty() {
        return Err(PolicyError::Empty {
            at: at.to_string(),
            field,
        });
    }
    let selectors = items
        .iter()
        .map(|item| selector(at, item, groups))
        .collect::<Result<Vec<_>, _>>()?;
    if field == "from" && selectors.contains(&Selector::Internet) {
        return Err(PolicyError::InternetAsSource { at: at.to_string() });
    }
    Ok(selectors)
}

fn selector(
    at: &str,
    item: &str,
    groups: &BTreeMap<String, Vec<HostGlob>>,
) -> Result<Selector, PolicyError> {
    let item = item.trim();
    if item == "*" {
        return Ok(Selector::Any);
    }
    if item == "internet" {
        return Ok(Selector::Internet);
    }
    if let Some(name) = item.strip_prefix("group:") {
        if !groups.contains_key(name) {
            return Err(PolicyError::UnknownGroup {
                at: at.to_string(),
                name: name.to_string(),
            });
        }
        return Ok(Selector::Group(name.to_string()));
    }
    if looks_like_address(item) {
        return cidr(at, item).map(Selector::Cidr);
    }
    glob(at, item).map(Selector::Host)
}

/// Hostnames never hold `/` or `:`, and an all-digits-and-dots text is an address.
fn looks_like_address(item: &str) -> bool {
    item.contains('/')
        || item.contains(':')
        || (!item.is_empty() && item.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

fn cidr(at: &str, text: &str) -> Result<IpNet, PolicyError> {
    let bad = |reason: &str| PolicyError::BadCidr {
        at: at.to_string(),
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let Some((addr, _)) = text.split_once('/') else {
        return Err(bad("missing prefix length (e.g. 198.51.100.0/24)"));
    };
    if addr.parse::<IpAddr>().is_err() {
        return Err(bad("not an IPv4 or IPv6 address"));
    }
    let net: IpNet = text
        .parse()
        .map_err(|_| bad("bad prefix length (at most 32 for IPv4, 128 for IPv6)"))?;
    if net.trunc() != net {
        return Err(bad(&format!(
            "host bits are set (did you mean {}?)",
            net.trunc()
        )));
    }
    Ok(net)
}

fn glob(at: &str, text: &str) -> Result<HostGlob, PolicyError> {
    let bad = |reason: String| PolicyError::BadGlob {
        at: at.to_string(),
        text: text.to_string(),
        reason,
    };
    if text.is_empty() {
        return Err(bad("empty".into()));
    }
    if text.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(bad("a hostname holds no spaces or `/`".into()));
    }
    HostGlob::new(text).map_err(|e| bad(e.msg.to_string()))
}

fn proto(at: &str, raw: RawProto) -> Result<Proto, PolicyError> {
    let bad = |text: String| PolicyError::BadProto {
        at: at.to_string(),
        text,
    };
    match raw {
        RawProto::Number(n) => u8::try_from(n)
            .map(Proto::Number)
            .map_err(|_| bad(n.to_string())),
        RawProto::Name(name) => match name.to_ascii_lowercase().as_str() {
            "any" | "*" => Ok(Proto::Any),
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "icmp" | "icmpv6" | "ipv6-icmp" => Ok(Proto::Icmp),
            other => other
                .parse::<u8>()
                .map(Proto::Number)
                .map_err(|_| bad(name.clone())),
        },
    }
}

fn proto_name(proto: Proto) -> String {
    match proto {
        Proto::Any => "any".into(),
        Proto::Tcp => "tcp".into(),
        Proto::Udp => "udp".into(),
        Proto::Icmp => "icmp".into(),
        Proto::Number(n) => n.to_string(),
    }
}

fn port_range(at: &str, raw: &RawPort) -> Result<PortRange, PolicyError> {
    let text = match raw {
        RawPort::Text(t) => t.trim().to_string(),
        RawPort::Number(n) => n.to_string(),
    };
    let bad = || PolicyError::BadPort {
        at: at.to_string(),
        text: text.clone(),
    };
    let port = |s: &str| match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(bad()),
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(&text)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(bad());
    }
    Ok(PortRange { lo, hi })
}

fn approve_section(raw: RawApprove) -> Result<Approve, PolicyError> {
    let mut routes = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.into_iter().enumerate() {
        let at = format!("approve.routes entry {}", i + 1);
        let cidr = cidr(&at, &r.cidr)?;
        if r.by.is_empty() {
            return Err(PolicyError::Empty { at, field: "by" });
        }
        let by =
            r.by.iter()
                .map(|b| glob(&at, b))
                .collect::<Result<Vec<_>, _>>()?;
        routes.push(RouteApproval { cidr, by });
    }
    let relay = raw
        .relay
        .iter()
        .map(|g| glob("approve.relay", g))
        .collect::<Result<Vec<_>, _>>()?;
    let exit = raw
        .exit
        .iter()
        .map(|g| glob("approve.exit", g))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Approve {
        routes,
        relay,
        exit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of DESIGN §7 and §13, verbatim.
    pub(crate) const DESIGN_EXAMPLE: &str = r#"
[groups]
web = ["web*"]                  # hostname globs
ops = ["laptop*", "ops1"]

[[allow]]
from = ["group:ops"]            # group:NAME | hostname glob | CIDR (v4 or v6) | "*"
to   = ["*"]                    # proto and ports left out: everything

[[allow]]
from  = ["group:web", "198.51.100.0/24", "2001:db8:100::/64"]
to    = ["db*"]
proto = "tcp"                   # tcp | udp | icmp | any (default) | a protocol number
ports = ["5432", "8000-8099"]

[approve]
routes = [{ cidr = "198.51.100.0/24", by = ["router*"] }]
relay  = ["relay*"]
exit   = ["exit*"]
"#;

    fn err(text: &str) -> String {
        Policy::parse(text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn design_example_parses() {
        let p = Policy::parse(DESIGN_EXAMPLE).expect("valid");
        assert_eq!(p.groups.len(), 2);
        assert_eq!(p.allow.len(), 2);
        assert_eq!(p.allow[0].from, vec![Selector::Group("ops".into())]);
        assert_eq!(p.allow[0].to, vec![Selector::Any]);
        assert_eq!(p.allow[0].proto, Proto::Any);
        let r = &p.allow[1];
        assert_eq!(r.proto, Proto::Tcp);
        assert_eq!(
            r.ports,
            vec![
                PortRange { lo: 5432, hi: 5432 },
                PortRange { lo: 8000, hi: 8099 }
            ]
        );
        assert_eq!(
            r.from[1],
            Selector::Cidr("198.51.100.0/24".parse().expect("cidr"))
        );
        assert_eq!(
            r.from[2],
            Selector::Cidr("2001:db8:100::/64".parse().expect("cidr"))
        );
        assert!(matches!(&r.to[0], Selector::Host(g) if g.matches("db1") && !g.matches("web1")));
    }

    #[test]
    fn empty_file_is_an_empty_policy() {
        assert_eq!(Policy::parse("").expect("valid"), Policy::default());
    }

    #[test]
    fn approve_section_covers_prefixes_inside_and_matches_hostnames() {
        let p = Policy::parse(DESIGN_EXAMPLE).expect("valid");
        let inside: IpNet = "198.51.100.128/25".parse().expect("cidr");
        let outside: IpNet = "198.51.0.0/16".parse().expect("cidr");
        assert!(p.approve.approves_route("router-1", &inside));
        assert!(p.approve.approves_route("Router-1", &inside));
        assert!(!p.approve.approves_route("web1", &inside));
        assert!(!p.approve.approves_route("router-1", &outside));
        assert!(p.approve.approves_relay("relay-eu"));
        assert!(!p.approve.approves_relay("web1"));
        assert!(p.approve.approves_exit("exit1"));
        assert!(!p.approve.approves_exit("relay-eu"));
    }

    #[test]
    fn errors_name_the_rule() {
        let unknown =
            "[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\n[[allow]]\nfrom=[\"group:nope\"]\nto=[\"*\"]\n";
        assert_eq!(
            err(unknown),
            "allow rule 2: unknown group `nope` (groups are defined under [groups])"
        );
        let bad_cidr = "[[allow]]\nfrom=[\"198.51.100.0/33\"]\nto=[\"*\"]\n";
        assert!(err(bad_cidr).starts_with("allow rule 1: `198.51.100.0/33` is not a CIDR"));
        let host_bits = "[[allow]]\nfrom=[\"198.51.100.1/24\"]\nto=[\"*\"]\n";
        assert!(err(host_bits).contains("host bits are set (did you mean 198.51.100.0/24?)"));
        let bad_port = "[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\nproto=\"tcp\"\nports=[\"0\"]\n";
        assert!(err(bad_port).starts_with("allow rule 1: `0` is not a port"));
        let reversed = "[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\nproto=\"udp\"\nports=[\"90-80\"]\n";
        assert!(err(reversed).contains("`90-80` is not a port"));
        let too_big = "[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\nports=[\"70000\"]\n";
        assert!(err(too_big).contains("`70000` is not a port"));
        let icmp_ports = "[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\nproto=\"icmp\"\nports=[\"22\"]\n";
        assert_eq!(
            err(icmp_ports),
            "allow rule 1: ports apply only to tcp and udp, not to proto `icmp`"
        );
        let bad_proto = "[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\nproto=\"sctpx\"\n";
        assert!(err(bad_proto).starts_with("allow rule 1: unknown proto `sctpx`"));
        let empty = "[[allow]]\nfrom=[]\nto=[\"*\"]\n";
        assert_eq!(
            err(empty),
            "allow rule 1: `from` must list at least one entry"
        );
        let unknown_key = "[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\nport=[\"22\"]\n";
        assert!(err(unknown_key).starts_with("not a valid policy file"));
        let approve = "[approve]\nroutes=[{cidr=\"10.0.0.0\", by=[\"r*\"]}]\n";
        assert!(err(approve).starts_with(
            "approve.routes entry 1: `10.0.0.0` is not a CIDR: missing prefix length"
        ));
    }

    #[test]
    fn protocols_and_ports() {
        let p = Policy::parse(
            "[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\nproto=47\n[[allow]]\nfrom=[\"*\"]\nto=[\"*\"]\nports=[22, \"80\"]\n",
        )
        .expect("valid");
        assert_eq!(p.allow[0].proto, Proto::Number(47));
        assert_eq!(p.allow[1].proto, Proto::Any);
        assert_eq!(p.allow[1].ports.len(), 2);
    }

    #[test]
    fn internet_is_a_destination() {
        let p = Policy::parse("[[allow]]\nfrom=[\"laptop*\"]\nto=[\"internet\"]\n").expect("valid");
        assert_eq!(p.allow[0].to, vec![Selector::Internet]);
        assert_eq!(
            Policy::parse("[[allow]]\nfrom=[\"internet\"]\nto=[\"*\"]\n")
                .expect_err("a destination only")
                .to_string(),
            "allow rule 1: `internet` is a destination: use it in `to`, not in `from`"
        );
    }

    #[test]
    fn cidr_keeps_its_family() {
        let p = Policy::parse("[[allow]]\nfrom=[\"0.0.0.0/0\", \"::/0\"]\nto=[\"*\"]\n")
            .expect("valid");
        match (&p.allow[0].from[0], &p.allow[0].from[1]) {
            (Selector::Cidr(IpNet::V4(_)), Selector::Cidr(IpNet::V6(_))) => {}
            other => panic!("families lost: {other:?}"),
        }
    }
}
