//! Command line: every flag also reads an environment variable `NEXODUS_*`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::coord::ipam::{DEFAULT_ORG_CIDR, DEFAULT_ORG_CIDR_V6};
use crate::store::DEFAULT_ORG;

#[derive(Debug, Parser)]
#[command(
    name = "nexodus",
    version,
    about = "A WireGuard mesh in one binary: a coordinator (`serve`) and nodes (`join`).",
    long_about = "A WireGuard mesh in one binary.\n\n\
        On the coordinator host: `nexodus serve` (prints a join token on first start).\n\
        On every node: `nexodus join COORDINATOR:4443 --token TOKEN`.\n\n\
        Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more detail."
)]
pub struct Cli {
    /// Log line format on stderr: `text` for people, `json` (one object per line) for
    /// log shippers.
    #[arg(
        long,
        global = true,
        env = "NEXODUS_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Shells `nexodus completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl From<CompletionShell> for clap_complete::Shell {
    fn from(shell: CompletionShell) -> Self {
        match shell {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// Where the coordinator keeps its state. `serve` and the admin commands share these
/// defaults, so on the coordinator host the admin commands need no flags.
#[derive(Debug, Args, Clone)]
pub struct StateArgs {
    /// Directory for the coordinator's TLS identity (and the database unless --db is
    /// given). Default: /var/lib/nexodus as root, else $XDG_STATE_HOME/nexodus.
    #[arg(long, global = true, env = "NEXODUS_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// SQLite database file. Default: nexodus.db in the state directory.
    #[arg(long, global = true, env = "NEXODUS_DB", value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// PostgreSQL instead of SQLite (postgres://USER[:PASSWORD]@HOST[:PORT]/DB), shared
    /// by any number of coordinator replicas. The TLS identity is kept in the database
    /// too, so one join token works with every replica. Plain TCP: keep the database
    /// on the host or a trusted network.
    #[arg(
        long,
        global = true,
        env = "NEXODUS_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
}

impl StateArgs {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::fsutil::default_state_dir)
    }

    pub fn db(&self) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| self.state_dir().join("nexodus.db"))
    }

    /// PostgreSQL if a URL is given, else the SQLite file.
    pub fn database(&self) -> crate::store::Database {
        match &self.database_url {
            Some(url) => crate::store::Database::Postgres(url.clone()),
            None => crate::store::Database::Sqlite(self.db()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: control API over QUIC and STUN responders.
    Serve {
        /// QUIC control API address; the default `[::]` takes IPv4 and IPv6 (IPv4 only
        /// where the host has no IPv6).
        #[arg(long, env = "NEXODUS_LISTEN", default_value = "[::]:4443")]
        listen: SocketAddr,
        /// STUN address; the next port answers STUN too (symmetric NAT detection).
        #[arg(long, env = "NEXODUS_STUN_LISTEN", default_value = "[::]:3478")]
        stun_listen: SocketAddr,
        /// Serve Prometheus metrics on http://ADDR/metrics (off unless given), e.g.
        /// 127.0.0.1:9101.
        #[arg(long, env = "NEXODUS_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// Most QUIC connections from one source address (nodes behind one NAT share
        /// it; each node holds one).
        #[arg(long, env = "NEXODUS_MAX_CONNECTIONS_PER_IP", value_name = "N",
              default_value_t = crate::serve::limits::MAX_PER_IP)]
        max_connections_per_ip: usize,
        /// Serve the admin API (`/api/v1`) and the dashboard (`/`) over HTTPS here,
        /// e.g. [::]:8443 (off by default). Needs an admin key (`nexodus admin-key create`).
        #[arg(long, env = "NEXODUS_API_LISTEN", value_name = "ADDR")]
        api_listen: Option<SocketAddr>,
        /// A CA-signed certificate chain (PEM) for the API instead of the
        /// coordinator's own certificate (then create admin keys with `--api-cert`).
        #[arg(long, env = "NEXODUS_API_CERT", value_name = "FILE", requires_all = ["api_key_file", "api_listen"])]
        api_cert: Option<PathBuf>,
        /// The private key (PEM) of --api-cert.
        #[arg(
            long,
            env = "NEXODUS_API_KEY_FILE",
            value_name = "FILE",
            requires = "api_cert"
        )]
        api_key_file: Option<PathBuf>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Join this host to the mesh: register (first time) or reconnect, then run the
    /// WireGuard data plane on a TUN interface until stopped (SIGINT/SIGTERM removes the
    /// interface; the device stays registered).
    Join {
        /// Coordinator address(es), HOST[:PORT] (default port 4443), comma separated.
        #[arg(required = true, value_delimiter = ',', env = "NEXODUS_COORDINATOR")]
        coordinator: Vec<String>,
        /// Join token from `nexodus serve` or `nexodus token create`. Needed the first
        /// time only: afterwards the device credential in the state dir is used. Prefer
        /// --token-file: a command line is visible to every user of the host.
        #[arg(long, env = "NEXODUS_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Read the join token from this file (surrounding whitespace ignored); it must
        /// not be readable by group or others (chmod 600).
        #[arg(
            long,
            env = "NEXODUS_TOKEN_FILE",
            value_name = "PATH",
            conflicts_with = "token"
        )]
        token_file: Option<PathBuf>,
        /// TUN interface name.
        #[arg(long, env = "NEXODUS_INTERFACE", default_value = "nx0")]
        interface: String,
        /// Name shown to peers and in `nexodus devices` (default: the host name).
        #[arg(long, env = "NEXODUS_HOSTNAME")]
        hostname: Option<String>,
        /// WireGuard UDP port (default 51820, then the one kept in the state dir).
        #[arg(long, env = "NEXODUS_LISTEN_PORT")]
        listen_port: Option<u16>,
        /// Prefixes behind this node to route to it, v4 and v6 mixed, comma separated
        /// (e.g. 198.51.100.0/24,2001:db8:100::/64).
        #[arg(
            long,
            env = "NEXODUS_ADVERTISE_CIDR",
            value_delimiter = ',',
            value_parser = parse_cidr
        )]
        advertise_cidr: Vec<ipnet::IpNet>,
        /// Relay for the organization: forward between spokes (behind symmetric NAT or
        /// --relay-only) inside this process. Needs a publicly reachable UDP port.
        #[arg(long, env = "NEXODUS_RELAY")]
        relay: bool,
        /// Reach the organization only through its relay (no direct peering).
        #[arg(long, env = "NEXODUS_RELAY_ONLY", conflicts_with = "relay")]
        relay_only: bool,
        /// Persistent keepalive towards every peer, in seconds (0: off). Keeps NAT
        /// mappings open; lower it for NATs that forget UDP flows quickly.
        #[arg(long, env = "NEXODUS_KEEPALIVE", default_value_t = crate::node::mesh::KEEPALIVE_SECS)]
        keepalive: u16,
        /// With --advertise-cidr: masquerade mesh traffic to the advertised LANs (for
        /// LANs without a route back to the mesh; uses nftables).
        #[arg(long, env = "NEXODUS_MASQUERADE", requires = "advertise_cidr")]
        masquerade: bool,
        /// Offer this host's uplink as an exit for v4 and v6 (forwarding and
        /// masquerade in an nftables table of its own); usable once an admin approves
        /// it (`nexodus devices approve ID --exit`).
        #[arg(long, env = "NEXODUS_EXIT_NODE", conflicts_with = "use_exit_node")]
        exit_node: bool,
        /// Send all non-mesh traffic through the exit node HOSTNAME; while it is
        /// absent, offline or lacks a family, that traffic is dropped, never sent out
        /// of this host's uplink.
        #[arg(long, env = "NEXODUS_USE_EXIT_NODE", value_name = "HOSTNAME")]
        use_exit_node: Option<String>,
        /// With --use-exit-node: keep the local LAN off the tunnel.
        #[arg(long, env = "NEXODUS_EXIT_NODE_ALLOW_LAN", requires = "use_exit_node")]
        exit_node_allow_lan: bool,
        /// Point this host's resolver at the mesh DNS for the organization's domain
        /// only (systemd-resolved split DNS on the tunnel interface, undone on exit).
        /// Without systemd-resolved it says so and changes nothing.
        #[arg(long, env = "NEXODUS_DNS")]
        dns: bool,
        /// Rootless mode: no TUN device and no privileges; the tunnel ends in a
        /// userspace TCP/IP stack, reached through --ingress, --egress and --socks5.
        #[arg(long, env = "NEXODUS_USERSPACE", conflicts_with_all = ["advertise_cidr", "masquerade", "exit_node", "use_exit_node"])]
        userspace: bool,
        /// With --userspace: PROTO:PORT:HOST:HOSTPORT — connections to this node's mesh
        /// addresses on PORT go to HOST:HOSTPORT here (e.g. tcp:443:127.0.0.1:8443).
        /// Repeatable.
        #[arg(
            long,
            env = "NEXODUS_INGRESS",
            requires = "userspace",
            value_delimiter = ','
        )]
        ingress: Vec<String>,
        /// With --userspace: PROTO:LOCALPORT:MESHHOST:PORT — a local listener carrying
        /// connections to a mesh host (e.g. tcp:5432:100.64.0.5:5432, udp:5353:[200::5]:53).
        /// Repeatable.
        #[arg(
            long,
            env = "NEXODUS_EGRESS",
            requires = "userspace",
            value_delimiter = ','
        )]
        egress: Vec<String>,
        /// With --userspace: a SOCKS5 proxy into the mesh on this address
        /// (e.g. 127.0.0.1:1080).
        #[arg(long, env = "NEXODUS_SOCKS5", requires = "userspace")]
        socks5: Option<std::net::SocketAddr>,
        /// Serve Prometheus metrics (per-peer bytes and handshake age, drops) on
        /// http://ADDR/metrics (off unless given), e.g. 127.0.0.1:9102.
        #[arg(long, env = "NEXODUS_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// Ask for a specific tunnel address (v4 and/or v6; repeatable); refused if taken.
        #[arg(long, env = "NEXODUS_REQUEST_IP", value_delimiter = ',')]
        request_ip: Vec<std::net::IpAddr>,
        #[command(flatten)]
        state: NodeStateArgs,
    },
    /// Show this node's peers, paths, handshakes and traffic (asks the running node).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: NodeStateArgs,
    },
    /// Manage join tokens (admin, on the coordinator host).
    Token {
        #[command(subcommand)]
        action: TokenAction,
        #[command(flatten)]
        org: OrgArg,
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Manage organizations (admin, on the coordinator host).
    Org {
        #[command(subcommand)]
        action: OrgAction,
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Manage the admin API's keys (on the coordinator host): `create` prints a key
    /// (`nxa1.…`) for `--api-key` and the dashboard; only its hash is stored.
    AdminKey {
        #[command(subcommand)]
        action: AdminKeyAction,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List an organization's devices (what each claims, what is approved, what is
    /// pending), approve or revoke claims, add or remove devices (admin, on the
    /// coordinator host).
    Devices {
        #[command(subcommand)]
        action: Option<DevicesAction>,
        #[command(flatten)]
        org: OrgArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Manage an organization's policy file (admin, on the coordinator host). Its
    /// [approve] section approves devices' claims in advance; its [[allow]] rules are
    /// validated and stored.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
        #[command(flatten)]
        org: OrgArg,
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Print a shell completion script on stdout, e.g.
    /// `nexodus completions bash > /etc/bash_completion.d/nexodus`,
    /// `nexodus completions zsh > "${fpath[1]}/_nexodus"`,
    /// `nexodus completions fish > ~/.config/fish/completions/nexodus.fish`.
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Run a userspace WireGuard interface, configured with `wg`, `wg-quick` and the
    /// WireGuard userspace API as wireguard-go is (no mesh, no coordinator):
    /// `WG_QUICK_USERSPACE_IMPLEMENTATION="nexodus wg" wg-quick up wg0`.
    Wg {
        /// Stay in the foreground (also with WG_PROCESS_FOREGROUND=1); otherwise
        /// detach once the interface and its socket exist.
        #[arg(long, short = 'f', env = "NEXODUS_WG_FOREGROUND")]
        foreground: bool,
        /// The interface to create; its socket is /var/run/wireguard/IFNAME.sock.
        interface: String,
    },
    /// Benchmark: simulate many nodes against a running coordinator over real QUIC
    /// connections and report registrations/s, change fan-out latency and memory.
    #[command(hide = true)]
    Loadgen(crate::loadgen::LoadgenArgs),
}

/// Where a node keeps its key, credential and status socket.
#[derive(Debug, Args, Clone)]
pub struct NodeStateArgs {
    /// Node state directory (private key, device credential, listen port; 0600).
    /// Default: /var/lib/nexodus as root, else $XDG_STATE_HOME/nexodus.
    #[arg(long, env = "NEXODUS_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl NodeStateArgs {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::fsutil::default_state_dir)
    }
}

/// The organization an admin command acts on; accepted before or after the
/// subcommand (`nexodus devices --org lab add ...` = `nexodus devices add --org lab ...`).
#[derive(Debug, Args, Clone)]
pub struct OrgArg {
    /// Organization to act on (default: `default`).
    #[arg(long, global = true, env = "NEXODUS_ORG", value_name = "NAME")]
    pub org: Option<String>,
}

impl OrgArg {
    /// The organization named, or the default one.
    pub fn name(&self) -> &str {
        self.org.as_deref().unwrap_or(DEFAULT_ORG)
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a join token (for the --org given) and print it (only it) on stdout.
    Create {
        /// Allow any number of devices to join with this token (default: one).
        #[arg(long, env = "NEXODUS_TOKEN_REUSABLE")]
        reusable: bool,
        /// Lifetime, e.g. 30m, 24h, 7d (default: never expires).
        #[arg(long, env = "NEXODUS_TOKEN_EXPIRES", value_parser = parse_lifetime)]
        expires: Option<std::time::Duration>,
    },
    /// List join tokens (of the --org given, else of every organization); never
    /// their secrets.
    List,
    /// Revoke a join token by id (from `token list`): it joins nothing more.
    Revoke { id: i64 },
}

/// Run an admin command through a coordinator's HTTPS API instead of its database.
#[derive(Debug, Args, Clone)]
pub struct RemoteArgs {
    /// The coordinator's admin API, e.g. https://coord.example:8443.
    #[arg(
        long,
        global = true,
        env = "NEXODUS_API",
        value_name = "URL",
        requires = "api_key"
    )]
    pub api: Option<String>,
    /// An admin key (`nexodus admin-key create`); the API's certificate is pinned to
    /// the fingerprint it carries.
    #[arg(
        long,
        global = true,
        env = "NEXODUS_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AdminKeyAction {
    /// Create an admin key and print it (only it) on stdout.
    Create {
        /// A name to tell keys apart in `admin-key list`.
        #[arg(long, default_value = "admin")]
        name: String,
        /// The API's CA-signed certificate (PEM, as given to `serve --api-cert`): the
        /// key then pins it instead of the coordinator's own.
        #[arg(long, value_name = "FILE")]
        api_cert: Option<PathBuf>,
    },
    /// List admin keys (never their secrets).
    List,
    /// Revoke an admin key by id: it is refused from then on.
    Revoke { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum OrgAction {
    /// Create an organization with its own tunnel prefixes.
    Create {
        name: String,
        /// IPv4 tunnel prefix.
        #[arg(long, env = "NEXODUS_ORG_CIDR", default_value = DEFAULT_ORG_CIDR, value_parser = parse_cidr_v4)]
        cidr: Ipv4Net,
        /// IPv6 tunnel prefix.
        #[arg(long, env = "NEXODUS_ORG_CIDR_V6", default_value = DEFAULT_ORG_CIDR_V6, value_parser = parse_cidr_v6)]
        cidr_v6: Ipv6Net,
        /// DNS domain of its devices' names (HOSTNAME.DOMAIN; mesh DNS).
        #[arg(long, env = "NEXODUS_ORG_DOMAIN", default_value = crate::coord::names::DEFAULT_DOMAIN)]
        domain: String,
    },
    /// List organizations and their prefixes.
    List,
}

#[derive(Debug, Subcommand)]
pub enum DevicesAction {
    /// Register a device that runs stock WireGuard and print its wg-quick config. It
    /// reaches the mesh through the organization's relay.
    Add {
        /// Name shown in `nexodus devices` and to peers.
        #[arg(long)]
        hostname: String,
        /// The device's WireGuard public key (base64, as `wg pubkey` prints it).
        #[arg(
            long,
            required_unless_present = "generate_key",
            conflicts_with = "generate_key"
        )]
        public_key: Option<String>,
        /// Make the key pair here and print the private key once in the config (it is
        /// never stored).
        #[arg(long)]
        generate_key: bool,
    },
    /// Remove a device: its peers drop it and its addresses return to the pool. With
    /// --org, only if the device belongs to that organization.
    Remove {
        /// Device id, as `nexodus devices` lists it.
        id: i64,
    },
    /// Approve what a device claims (DESIGN §13): its advertised prefixes are
    /// installed by peers, and its relay or exit role is used, only once approved.
    /// With no --routes, --relay or --exit: everything it claims now. Takes effect on
    /// every node within a second.
    Approve {
        /// Device id, as `nexodus devices` lists it.
        id: i64,
        /// Prefixes to approve (comma-separated); a prefix the device advertises
        /// inside one of them counts as approved.
        #[arg(long, value_delimiter = ',', value_name = "CIDR[,CIDR…]")]
        routes: Vec<ipnet::IpNet>,
        /// Approve the relay role (`nexodus join --relay`).
        #[arg(long)]
        relay: bool,
        /// Approve the exit role.
        #[arg(long)]
        exit: bool,
    },
    /// Take approvals back: every approved prefix overlapping --routes, the relay or
    /// exit role. With no --routes, --relay or --exit: every approval of the device.
    /// Peers drop what is no longer approved within a second. (What the policy
    /// file's [approve] section approves stays approved: change the policy for that.)
    Revoke {
        /// Device id, as `nexodus devices` lists it.
        id: i64,
        /// Prefixes to revoke (comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "CIDR[,CIDR…]")]
        routes: Vec<ipnet::IpNet>,
        /// Revoke the relay role.
        #[arg(long)]
        relay: bool,
        /// Revoke the exit role.
        #[arg(long)]
        exit: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Validate a policy file (TOML: [groups], [[allow]], [approve]) and make it the
    /// organization's; prints its revision. A file that does not validate is refused
    /// with an error naming the rule, and the old policy stays.
    Set {
        /// The policy file.
        file: PathBuf,
    },
    /// Print the organization's policy file as stored.
    Show {
        /// Print JSON (organization, revision, updated_at, text).
        #[arg(long)]
        json: bool,
    },
    /// Remove the organization's policy: nothing is approved in advance any more.
    Clear,
}

/// A prefix `ADDR/LEN`; an address without `/LEN` says what is missing (the `ipnet`
/// parser's "invalid IP address syntax" points the wrong way).
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse().map_err(|_| cidr_error(s))
}

fn parse_cidr_v4(s: &str) -> Result<Ipv4Net, String> {
    s.parse().map_err(|_| cidr_error(s))
}

fn parse_cidr_v6(s: &str) -> Result<Ipv6Net, String> {
    s.parse().map_err(|_| cidr_error(s))
}

fn cidr_error(s: &str) -> String {
    match s.trim().parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => format!("missing prefix length (e.g. {a}/24)"),
        Ok(std::net::IpAddr::V6(a)) => format!("missing prefix length (e.g. {a}/64)"),
        Err(_) => "expected a prefix ADDRESS/LENGTH (e.g. 10.1.0.0/24 or fd00:1::/64)".into(),
    }
}

/// A token lifetime such as `30m`, `24h`, `7d`; zero is refused (the token would be
/// expired before anyone could use it).
pub fn parse_lifetime(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.as_secs() == 0 {
        return Err(
            "a token that expires at once could never be used; give a lifetime \
                    such as 30m, 24h or 7d, or leave --expires out for one that never expires"
                .into(),
        );
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_errors_say_what_is_wrong() {
        assert_eq!(
            parse_cidr("10.1.0.0"),
            Err("missing prefix length (e.g. 10.1.0.0/24)".into())
        );
        assert_eq!(
            parse_cidr_v6("fd00:1::"),
            Err("missing prefix length (e.g. fd00:1::/64)".into())
        );
        assert_eq!(
            parse_cidr("10.1.0.0/24"),
            Ok("10.1.0.0/24".parse().unwrap())
        );
        assert!(parse_lifetime("0s").is_err());
        assert!(parse_lifetime("500ms").is_err());
        assert_eq!(
            parse_lifetime("1h"),
            Ok(std::time::Duration::from_secs(3600))
        );
    }
}
