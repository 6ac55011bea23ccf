//! The `nexodus` binary: parse the command line, start logging, dispatch.

use anyhow::{Context, Result};
use clap::Parser;

use nexodus::cli::{Cli, Command, DevicesAction, LogFormat, OrgAction, PolicyAction, TokenAction};
use nexodus::policy::approve::AdminDevice;
use nexodus::serve::{self, ServeConfig};
use nexodus::wire::control::Approved;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: a cause whose text the
/// messages before it already contain (an error that prints its source) is skipped.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Logs go to stderr, filtered by RUST_LOG (default `info`), as text or JSON lines.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,boringtun=off".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(
                clap_complete::Shell::from(shell),
                &mut cmd,
                "nexodus",
                &mut script,
            );
            match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
                // `nexodus completions bash | head` is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(e).context("writing the completion script")
                }
                _ => Ok(()),
            }
        }
        Command::Serve {
            listen,
            stun_listen,
            metrics_listen,
            max_connections_per_ip,
            state,
        } => {
            let cfg = ServeConfig {
                listen,
                stun_listen,
                metrics_listen,
                max_connections_per_ip,
                database: state.database(),
                state_dir: state.state_dir(),
            };
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(async {
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let run = serve::run(cfg, async {
                    let _ = stopped.await;
                });
                tokio::pin!(run);
                tokio::select! {
                    r = &mut run => return r.context("coordinator failed"),
                    () = shutdown_signal() => {}
                }
                tracing::info!("shutting down");
                let _ = stop.send(());
                // Serving: it closes every connection with a reason. Still starting:
                // nothing to close.
                match tokio::time::timeout(std::time::Duration::from_secs(2), run).await {
                    Ok(r) => r.context("coordinator failed"),
                    Err(_) => Ok(()),
                }
            })
        }
        Command::Join {
            coordinator,
            token,
            token_file,
            interface,
            hostname,
            listen_port,
            advertise_cidr,
            request_ip,
            relay,
            relay_only,
            masquerade,
            exit_node,
            use_exit_node,
            exit_node_allow_lan,
            dns,
            keepalive,
            userspace,
            ingress,
            egress,
            socks5,
            metrics_listen,
            state,
        } => {
            let userspace = if userspace {
                Some(nexodus::userspace::UserspaceConfig::parse(
                    nexodus::userspace::UserspaceArgs {
                        ingress,
                        egress,
                        socks5,
                    },
                )?)
            } else {
                None
            };
            for cidr in &advertise_cidr {
                nexodus::coord::ipam::validate_advertised(*cidr)
                    .with_context(|| format!("--advertise-cidr {cidr}"))?;
            }
            let token = match token_file {
                Some(path) => Some(nexodus::join::read_token_file(&path)?),
                None => token,
            };
            let cfg = nexodus::join::JoinConfig {
                coordinators: coordinator,
                token,
                state_dir: state.state_dir(),
                interface,
                hostname,
                listen_port,
                advertise_cidrs: advertise_cidr,
                request_ips: request_ip,
                relay,
                relay_only,
                masquerade,
                keepalive,
                userspace,
                metrics_listen,
                exit_node,
                use_exit_node,
                exit_node_allow_lan,
                dns,
            };
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(nexodus::join::run(cfg, shutdown_signal()))
                .context("node failed")
        }
        Command::Status { json, state } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let status = rt.block_on(nexodus::join::status::query(&state.state_dir()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", nexodus::join::status::render(&status));
            }
            Ok(())
        }
        Command::Token {
            action:
                TokenAction::Create {
                    reusable,
                    expires,
                    state,
                },
            org,
        } => {
            let mut st = serve::open_existing(&state.database(), &state.state_dir())?;
            let token = serve::create_token(&mut st, org.name(), reusable, expires)?;
            println!("{token}");
            Ok(())
        }
        Command::Org {
            action:
                OrgAction::Create {
                    name,
                    cidr,
                    cidr_v6,
                    domain,
                    state,
                },
        } => {
            let mut st = serve::open_existing(&state.database(), &state.state_dir())?;
            let org = st
                .store
                .create_org_in(&name, cidr, cidr_v6, &domain, serve::unix_now())?;
            println!(
                "created organization {} (id {}) with {} and {}, names under {}",
                org.name, org.id, org.ip_cidr, org.ip_cidr_v6, org.domain
            );
            Ok(())
        }
        Command::Devices {
            action,
            org,
            json,
            state,
        } => {
            let mut st = serve::open_existing(&state.database(), &state.state_dir())?;
            match action {
                Some(DevicesAction::Add {
                    hostname,
                    public_key,
                    generate_key: _,
                }) => {
                    let (device, config) = serve::add_unmanaged(
                        &mut st,
                        org.name(),
                        &hostname,
                        public_key.as_deref(),
                    )?;
                    eprintln!(
                        "added device {} (id {}) as a stock WireGuard spoke; its wg-quick config:",
                        device.hostname, device.id
                    );
                    print!("{config}");
                }
                Some(DevicesAction::Remove { id }) => {
                    if let Some(name) = &org.org {
                        let org = st.store.org_by_name(name)?;
                        if !st.store.devices(org.id)?.iter().any(|d| d.id == id) {
                            anyhow::bail!(
                                "device {id} is not in organization {name:?} (see `nexodus devices --org {name}`)"
                            );
                        }
                    }
                    st.store.remove_device(id, serve::unix_now())?;
                    println!("removed device {id}");
                }
                Some(DevicesAction::Approve {
                    id,
                    routes,
                    relay,
                    exit,
                }) => change_approval(&mut st, org.org.as_deref(), id, true, &routes, relay, exit)?,
                Some(DevicesAction::Revoke {
                    id,
                    routes,
                    relay,
                    exit,
                }) => {
                    change_approval(&mut st, org.org.as_deref(), id, false, &routes, relay, exit)?
                }
                None => {
                    let org = st.store.org_by_name(org.name())?;
                    let devices = st.store.admin_devices(org.id)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&devices)?);
                    } else {
                        print_devices(&devices, serve::unix_now());
                    }
                }
            }
            Ok(())
        }
        Command::Policy { action, org, state } => {
            let mut st = serve::open_existing(&state.database(), &state.state_dir())?;
            let org = st.store.org_by_name(org.name())?;
            match action {
                PolicyAction::Set { file } => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let revision = st
                        .store
                        .set_policy(org.id, &text, serve::unix_now())
                        .with_context(|| format!("{}", file.display()))?;
                    eprintln!(
                        "stored the policy of organization {:?}; its revision:",
                        org.name
                    );
                    println!("{revision}");
                }
                PolicyAction::Show { json } => {
                    let policy = st.store.policy(org.id)?;
                    if json {
                        let value = serde_json::json!({
                            "organization": org.name,
                            "revision": policy.as_ref().map(|p| p.revision),
                            "updated_at": policy.as_ref().map(|p| p.updated_at),
                            "text": policy.as_ref().map(|p| p.text.as_str()),
                        });
                        println!("{}", serde_json::to_string_pretty(&value)?);
                    } else if let Some(p) = policy {
                        eprintln!(
                            "policy of organization {:?}, revision {}:",
                            org.name, p.revision
                        );
                        print!("{}", p.text);
                    } else {
                        eprintln!(
                            "organization {:?} has no policy: everything is allowed, nothing approved in advance",
                            org.name
                        );
                    }
                }
                PolicyAction::Clear => {
                    if st.store.clear_policy(org.id, serve::unix_now())? {
                        println!("cleared the policy of organization {:?}", org.name);
                    } else {
                        println!("organization {:?} had no policy", org.name);
                    }
                }
            }
            Ok(())
        }
        Command::Loadgen(mut args) => {
            if let Some(path) = args.token_file.take() {
                args.token = Some(nexodus::join::read_token_file(&path)?);
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let report = rt.block_on(nexodus::loadgen::run(args))?;
            println!("{report}");
            Ok(())
        }
    }
}

fn print_devices(devices: &[AdminDevice], now: i64) {
    println!(
        "{:<5} {:<20} {:<32} {:<15} {:<24} {:<6} {:<8} {:<22} {:<10} {:<28} PENDING",
        "ID",
        "HOSTNAME",
        "NAME",
        "TUNNEL IP",
        "TUNNEL IPV6",
        "ROLE",
        "STATE",
        "ENDPOINT",
        "LAST SEEN",
        "APPROVED"
    );
    for a in devices {
        let d = &a.device;
        let role = if d.unmanaged {
            "stock"
        } else if a.in_effect.relay {
            "relay"
        } else if d.relay_only {
            "spoke"
        } else {
            "node"
        };
        let endpoint = d
            .reflexive_endpoint
            .or_else(|| d.endpoints.first().copied())
            .map_or_else(|| "-".to_string(), |e| e.to_string());
        println!(
            "{:<5} {:<20} {:<32} {:<15} {:<24} {:<6} {:<8} {:<22} {:<10} {:<28} {}",
            d.id,
            d.hostname,
            format!("{}.{}", d.name, d.domain),
            d.tunnel_ip,
            d.tunnel_ip_v6
                .map_or_else(|| "-".to_string(), |a| a.to_string()),
            role,
            if d.online { "online" } else { "offline" },
            endpoint,
            if d.online {
                "online".to_string()
            } else {
                format!("{}s ago", (now - d.last_seen).max(0))
            },
            claims(&a.in_effect),
            claims(&a.pending),
        );
    }
}

/// Claims as a short list: `relay,exit,198.51.100.0/24`, or `-`.
fn claims(a: &Approved) -> String {
    let mut parts: Vec<String> = Vec::new();
    if a.relay {
        parts.push("relay".into());
    }
    if a.exit {
        parts.push("exit".into());
    }
    parts.extend(a.routes.iter().map(ToString::to_string));
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// A device not found while `--org` was given: say where it was looked for.
fn not_in_org(e: nexodus::store::StoreError, id: i64, org: Option<&str>) -> anyhow::Error {
    match (&e, org) {
        (nexodus::store::StoreError::DeviceNotFound(_), Some(name)) => anyhow::anyhow!(
            "device {id} is not in organization {name:?} (see `nexodus devices --org {name}`)"
        ),
        _ => e.into(),
    }
}

/// After `devices approve|revoke`: what of the device is in effect and pending.
/// `devices approve` (`approve`) or `devices revoke` of device `id`, which must be in
/// organization `org` when one is named; prints what is approved and pending after.
fn change_approval(
    st: &mut serve::CoordinatorState,
    org: Option<&str>,
    id: i64,
    approve: bool,
    routes: &[ipnet::IpNet],
    relay: bool,
    exit: bool,
) -> Result<()> {
    let org_id = org
        .map(|name| st.store.org_by_name(name).map(|o| o.id))
        .transpose()?;
    let now = serve::unix_now();
    let changed = if approve {
        st.store.approve(org_id, id, routes, relay, exit, now)
    } else {
        st.store.revoke(org_id, id, routes, relay, exit, now)
    };
    let d = changed.map_err(|e| not_in_org(e, id, org))?;
    print_approval(st, d.organization_id, id)
}

fn print_approval(st: &mut serve::CoordinatorState, org: i64, id: i64) -> Result<()> {
    let a = st
        .store
        .admin_devices(org)?
        .into_iter()
        .find(|a| a.device.id == id)
        .with_context(|| format!("device {id} is gone"))?;
    println!(
        "device {} ({}): in effect: {}; pending: {}",
        id,
        a.device.hostname,
        claims(&a.in_effect),
        claims(&a.pending)
    );
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
