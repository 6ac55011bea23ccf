//! The `nexodus` binary: parse the command line, start logging, dispatch.

use anyhow::{Context, Result};
use clap::Parser;

use nexodus::admin::client::Remote;
use nexodus::admin::{Admin, ApprovalChange, OnHost, format_time, render_orgs, render_tokens};
use nexodus::cli::{
    AdminKeyAction, Cli, Command, DevicesAction, LogFormat, OrgAction, PolicyAction, RemoteArgs,
    StateArgs, TokenAction,
};
use nexodus::policy::approve::AdminDevice;
use nexodus::serve::{self, ServeConfig};
use nexodus::wire::control::Approved;
use rustls_pki_types::pem::PemObject;

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
            api_listen,
            api_cert,
            api_key_file,
            state,
        } => {
            let cfg = ServeConfig {
                listen,
                stun_listen,
                metrics_listen,
                max_connections_per_ip,
                api_listen,
                api_cert: api_cert.zip(api_key_file),
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
        Command::Wg {
            foreground,
            interface,
        } => {
            let foreground =
                foreground || std::env::var_os("WG_PROCESS_FOREGROUND").is_some_and(|v| v == "1");
            if !foreground {
                return nexodus::wgmode::detach(&interface).context("nexodus wg");
            }
            let result = nexodus::wgmode::run(&interface);
            if let Err(e) = &result
                && std::env::var_os(nexodus::wgmode::NOTIFY_ENV).is_some()
            {
                // The parent waiting for us reads this line and says it.
                println!("{e}");
            }
            result.context("nexodus wg")
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
            action,
            org,
            remote,
            state,
        } => {
            let mut admin = admin_session(&remote, &state)?;
            match action {
                TokenAction::Create { reusable, expires } => {
                    let t =
                        admin.create_token(org.name(), reusable, expires.map(|d| d.as_secs()))?;
                    println!("{}", t.token);
                }
                TokenAction::List => {
                    let tokens = admin.tokens(org.org.as_deref())?;
                    print!("{}", render_tokens(&tokens, serve::unix_now()));
                }
                TokenAction::Revoke { id } => {
                    admin.revoke_token(org.org.as_deref(), id)?;
                    println!("revoked join token {id}");
                }
            }
            Ok(())
        }
        Command::Org {
            action,
            remote,
            state,
        } => {
            let mut admin = admin_session(&remote, &state)?;
            match action {
                OrgAction::Create {
                    name,
                    cidr,
                    cidr_v6,
                    domain,
                } => {
                    let org = admin.create_org(&name, cidr, cidr_v6, &domain)?;
                    println!(
                        "created organization {} (id {}) with {} and {}, names under {}",
                        org.name, org.id, org.cidr, org.cidr_v6, org.domain
                    );
                }
                OrgAction::List => print!("{}", render_orgs(&admin.orgs()?)),
            }
            Ok(())
        }
        Command::AdminKey { action, state } => {
            let mut st = serve::open_existing(&state.database(), &state.state_dir())?;
            match action {
                AdminKeyAction::Create { name, api_cert } => {
                    let fingerprint = match api_cert {
                        Some(path) => {
                            let pem = std::fs::read(&path)
                                .with_context(|| format!("reading {}", path.display()))?;
                            let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                                .next()
                                .with_context(|| format!("no certificate in {}", path.display()))?
                                .with_context(|| format!("reading {}", path.display()))?;
                            nexodus::identity::fingerprint(&der)
                        }
                        None => st.identity.fingerprint(),
                    };
                    let mut secret = [0u8; 32];
                    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
                    let key = nexodus::coord::adminkey::AdminKeyText {
                        fingerprint,
                        secret,
                    };
                    let id =
                        st.store
                            .create_admin_key(&name, &key.secret_hash(), serve::unix_now())?;
                    eprintln!(
                        "created admin key {id} ({name}); give it as --api-key (or NEXODUS_API_KEY), \
                         or open the dashboard at https://COORDINATOR:PORT/#key=KEY"
                    );
                    println!("{key}");
                }
                AdminKeyAction::List => {
                    println!("{:<6} {:<24} {:<21} REVOKED", "ID", "NAME", "CREATED");
                    for k in st.store.admin_keys()? {
                        println!(
                            "{:<6} {:<24} {:<21} {}",
                            k.id,
                            k.name,
                            format_time(k.created_at),
                            k.revoked_at.map_or_else(|| "-".to_string(), format_time)
                        );
                    }
                }
                AdminKeyAction::Revoke { id } => {
                    st.store.revoke_admin_key(id, serve::unix_now())?;
                    println!("revoked admin key {id}");
                }
            }
            Ok(())
        }
        Command::Devices {
            action,
            org,
            json,
            remote,
            state,
        } => {
            if let Some(DevicesAction::Add {
                hostname,
                public_key,
                generate_key: _,
            }) = &action
            {
                if remote.api.is_some() {
                    anyhow::bail!(
                        "`devices add` works on the coordinator host only (it prints a private key)"
                    );
                }
                let mut st = serve::open_existing(&state.database(), &state.state_dir())?;
                let (device, config) =
                    serve::add_unmanaged(&mut st, org.name(), hostname, public_key.as_deref())?;
                eprintln!(
                    "added device {} (id {}) as a stock WireGuard spoke; its wg-quick config:",
                    device.hostname, device.id
                );
                print!("{config}");
                return Ok(());
            }
            let mut admin = admin_session(&remote, &state)?;
            match action {
                Some(DevicesAction::Add { .. }) => {}
                Some(DevicesAction::Remove { id }) => {
                    admin.remove_device(org.org.as_deref(), id)?;
                    println!("removed device {id}");
                }
                Some(DevicesAction::Approve {
                    id,
                    routes,
                    relay,
                    exit,
                }) => {
                    let change = ApprovalChange {
                        routes,
                        relay,
                        exit,
                    };
                    let a = admin.change_approval(org.org.as_deref(), id, true, &change)?;
                    print_approval(&a);
                }
                Some(DevicesAction::Revoke {
                    id,
                    routes,
                    relay,
                    exit,
                }) => {
                    let change = ApprovalChange {
                        routes,
                        relay,
                        exit,
                    };
                    let a = admin.change_approval(org.org.as_deref(), id, false, &change)?;
                    print_approval(&a);
                }
                None => {
                    let devices = admin.devices(org.name())?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&devices)?);
                    } else {
                        print_devices(&devices, serve::unix_now());
                    }
                }
            }
            Ok(())
        }
        Command::Policy {
            action,
            org,
            remote,
            state,
        } => {
            let mut admin = admin_session(&remote, &state)?;
            match action {
                PolicyAction::Set { file } => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let p = admin
                        .set_policy(org.name(), &text)
                        .with_context(|| format!("{}", file.display()))?;
                    eprintln!(
                        "stored the policy of organization {:?}; its revision:",
                        p.organization
                    );
                    println!("{}", p.revision.unwrap_or_default());
                }
                PolicyAction::Show { json } => {
                    let p = admin.policy(org.name())?;
                    if json {
                        let value = serde_json::json!({
                            "organization": p.organization,
                            "revision": p.revision,
                            "updated_at": p.updated_at,
                            "text": p.text,
                        });
                        println!("{}", serde_json::to_string_pretty(&value)?);
                    } else if let (Some(text), Some(revision)) = (&p.text, p.revision) {
                        eprintln!(
                            "policy of organization {:?}, revision {}:",
                            p.organization, revision
                        );
                        print!("{text}");
                    } else {
                        eprintln!(
                            "organization {:?} has no policy: everything is allowed, nothing approved in advance",
                            p.organization
                        );
                    }
                }
                PolicyAction::Clear => {
                    let c = admin.clear_policy(org.name())?;
                    if c.cleared {
                        println!("cleared the policy of organization {:?}", c.organization);
                    } else {
                        println!("organization {:?} had no policy", c.organization);
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
        "{:<5} {:<20} {:<32} {:<15} {:<24} {:<6} {:<8} {:<22} {:<30} {:<10} {:<28} PENDING",
        "ID",
        "HOSTNAME",
        "NAME",
        "TUNNEL IP",
        "TUNNEL IPV6",
        "ROLE",
        "STATE",
        "ENDPOINT",
        "ENDPOINT V6",
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
        // The v6 underlay endpoint (DESIGN §9): STUN over v6, else the first v6
        // address the device reported.
        let endpoint_v6 = d
            .reflexive_endpoint_v6
            .or(d.reflexive_endpoint)
            .filter(std::net::SocketAddr::is_ipv6)
            .or_else(|| {
                d.endpoints
                    .iter()
                    .copied()
                    .find(std::net::SocketAddr::is_ipv6)
            })
            .map_or_else(|| "-".to_string(), |e| e.to_string());
        println!(
            "{:<5} {:<20} {:<32} {:<15} {:<24} {:<6} {:<8} {:<22} {:<30} {:<10} {:<28} {}",
            d.id,
            d.hostname,
            format!("{}.{}", d.name, d.domain),
            d.tunnel_ip,
            d.tunnel_ip_v6
                .map_or_else(|| "-".to_string(), |a| a.to_string()),
            role,
            if d.online { "online" } else { "offline" },
            endpoint,
            endpoint_v6,
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

/// After `devices approve|revoke`: what of the device is in effect and pending.
fn print_approval(a: &AdminDevice) {
    println!(
        "device {} ({}): in effect: {}; pending: {}",
        a.device.id,
        a.device.hostname,
        claims(&a.in_effect),
        claims(&a.pending)
    );
}

/// The admin operations: through the API with `--api`, else on this host's
/// coordinator state.
fn admin_session(remote: &RemoteArgs, state: &StateArgs) -> Result<Box<dyn Admin>> {
    match (&remote.api, &remote.api_key) {
        (Some(url), Some(key)) => Ok(Box::new(Remote::new(url, key)?)),
        (Some(_), None) => anyhow::bail!("--api needs --api-key (or NEXODUS_API_KEY)"),
        _ => Ok(Box::new(OnHost {
            state: serve::open_existing(&state.database(), &state.state_dir())?,
        })),
    }
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
