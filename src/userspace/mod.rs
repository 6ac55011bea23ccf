//! Rootless mode (`nexodus join --userspace`): the tunnel ends in a userspace TCP/IP
//! stack (smoltcp) instead of a TUN device, and rules carry connections between the
//! mesh and local sockets (ingress, egress, SOCKS5).
//!
//! The data path exchanges IP packets with this stack over an in-process packet pipe
//! ([`crate::io::packet_pipe`], [`crate::io::tun::PacketDevice::Pipe`]), so nothing
//! here needs privileges.
//!
//! - [`rule`], [`socks`], [`flows`], [`tcp_flows`], `status`, [`packet`]: pure parts
//!   (rule syntax, SOCKS5 messages, UDP flow tables with idle expiry, ports, SOCKS5
//!   relay clients and reachable destinations, TCP flow tables with their phases and
//!   limits, the status snapshot and when to take it, a look at SYNs), given `now`
//!   and unit tested without sockets;
//! - `stack`: the driver thread (smoltcp interface, sockets, local sockets; one clock
//!   read per turn), with `stack::tcp` and `stack::udp` moving the bytes;
//! - `socks_session`: one SOCKS5 client's negotiation, in a task of its own;
//! - `device`: the smoltcp device on the stack's end of the packet pipe.
//!
//! Not here: name resolution (SOCKS5 clients give addresses; mesh hosts have no
//! names yet), IP fragments, ICMP errors to TCP flows.

mod device;
pub mod flows;
pub mod packet;
pub mod rule;
pub mod socks;
mod socks_session;
mod stack;
mod status;
pub mod tcp_flows;

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use flows::UDP_IDLE;
pub use rule::{Direction, Proto, Rule, RuleError};

#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    #[error("bad rule --{flag} {rule:?}: {source}")]
    BadRule {
        flag: &'static str,
        rule: String,
        #[source]
        source: RuleError,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("userspace stack: {0}")]
    Stack(String),
}

/// What the user asked for on the command line (raw rule strings, parsed by
/// [`UserspaceConfig::parse`]).
#[derive(Debug, Clone, Default)]
pub struct UserspaceArgs {
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
    pub socks5: Option<SocketAddr>,
}

/// Local sockets bound while validating (so a port in use is an error before the node
/// enrolls), keyed by rule index.
#[derive(Debug, Default)]
pub(crate) struct Bound {
    tcp: HashMap<usize, std::net::TcpListener>,
    udp: HashMap<usize, std::net::UdpSocket>,
    socks: Option<std::net::TcpListener>,
}

/// Validated configuration, with its local listeners already bound.
#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    pub rules: Vec<Rule>,
    pub socks5: Option<SocketAddr>,
    bound: Arc<Mutex<Option<Bound>>>,
}

fn listen_error(what: String, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> UserspaceError {
    move |source| UserspaceError::Listen { what, addr, source }
}

impl UserspaceConfig {
    /// Validates every rule and binds every local listener before anything starts.
    pub fn parse(args: UserspaceArgs) -> Result<Self, UserspaceError> {
        let mut rules = Vec::new();
        for (flag, list, parse) in [
            ("ingress", &args.ingress, Rule::ingress as fn(&str) -> _),
            ("egress", &args.egress, Rule::egress),
        ] {
            for raw in list {
                let rule = parse(raw).map_err(|source| UserspaceError::BadRule {
                    flag,
                    rule: raw.clone(),
                    source,
                })?;
                rules.push(rule);
            }
        }
        rule::check_conflicts(&rules).map_err(|e| {
            let (r, source) = *e;
            UserspaceError::BadRule {
                flag: match r.direction {
                    Direction::Ingress => "ingress",
                    Direction::Egress => "egress",
                },
                rule: r.to_string(),
                source,
            }
        })?;
        let mut bound = Bound::default();
        for (i, r) in rules.iter().enumerate() {
            if r.direction != Direction::Egress {
                continue;
            }
            let err = listen_error(r.to_string(), r.listen);
            match r.proto {
                Proto::Tcp => {
                    let l = std::net::TcpListener::bind(r.listen).map_err(err)?;
                    l.set_nonblocking(true)
                        .map_err(listen_error(r.to_string(), r.listen))?;
                    bound.tcp.insert(i, l);
                }
                Proto::Udp => {
                    let s = std::net::UdpSocket::bind(r.listen).map_err(err)?;
                    s.set_nonblocking(true)
                        .map_err(listen_error(r.to_string(), r.listen))?;
                    bound.udp.insert(i, s);
                }
            }
        }
        if let Some(addr) = args.socks5 {
            let l =
                std::net::TcpListener::bind(addr).map_err(listen_error("socks5".into(), addr))?;
            l.set_nonblocking(true)
                .map_err(listen_error("socks5".into(), addr))?;
            bound.socks = Some(l);
        }
        Ok(Self {
            rules,
            socks5: args.socks5,
            bound: Arc::new(Mutex::new(Some(bound))),
        })
    }
}

/// One rule and how many flows it carries now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    /// As written, e.g. `ingress tcp:443:127.0.0.1:8443` or `socks5 127.0.0.1:1080`.
    pub rule: String,
    pub open_flows: usize,
}

/// One open flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStatus {
    pub rule: String,
    /// "tcp" or "udp".
    pub proto: String,
    /// Ingress: the mesh peer. Egress and SOCKS5: the local client.
    pub from: SocketAddr,
    /// Ingress: the local service. Egress and SOCKS5: the mesh host (a SOCKS5 UDP
    /// association: its local relay address).
    pub to: SocketAddr,
    pub to_mesh_bytes: u64,
    pub from_mesh_bytes: u64,
}

/// Rules and flows for `nexodus status` (refreshed a few times a second while
/// flows come and go).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserspaceStatus {
    pub rules: Vec<RuleStatus>,
    pub open_flows: Vec<FlowStatus>,
}

/// The running stack: a thread of its own, stopped when this is dropped.
pub struct Stack {
    status: Arc<Mutex<UserspaceStatus>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Stack {
    /// Starts the stack on `pipe` with the node's mesh addresses.
    pub fn start(
        config: UserspaceConfig,
        pipe: crate::io::packet_pipe::End,
        v4: Ipv4Addr,
        v6: Option<Ipv6Addr>,
        mtu: u16,
        names: stack::Names,
    ) -> Result<Self, UserspaceError> {
        let bound = config
            .bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                UserspaceError::Stack("the rules' listeners were already used".into())
            })?;
        let status = Arc::new(Mutex::new(UserspaceStatus::default()));
        let params = stack::Params {
            rules: config.rules,
            socks5: config.socks5,
            bound,
            v4,
            v6,
            mtu,
            names,
        };
        let (shutdown, stop) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let st = status.clone();
        std::thread::Builder::new()
            .name("nexodus-stack".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(UserspaceError::Stack(e.to_string())));
                        return;
                    }
                };
                rt.block_on(async move {
                    match stack::Driver::new(params, pipe, st) {
                        Ok(d) => {
                            let _ = ready_tx.send(Ok(()));
                            d.run(stop).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| UserspaceError::Stack(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| UserspaceError::Stack("the stack thread died".into()))??;
        tracing::info!(%v4, ?v6, "userspace stack running");
        Ok(Self {
            status,
            _shutdown: shutdown,
        })
    }

    pub fn status(&self) -> UserspaceStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
