//! weir's command line: parse arguments, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use weir::config::{values, Config, ConfigWarning, Loaded};
use weir::server::RunOptions;

// A quarter of a proxy's user-space CPU goes to malloc/free under glibc; mimalloc's per-thread
// free lists cut that (measured with peers.sh, see the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weir", version, about = "Fault-tolerant HTTP edge gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// Native YAML or ServiceQ sq.properties file.
        #[arg(short = 'c', long = "conf", default_value = "conf/weir.yaml")]
        config: PathBuf,
        /// Override the listener address of the file (e.g. 127.0.0.1:5252).
        #[arg(long)]
        listen: Option<String>,
        /// Start as the successor of a running weir (zero-downtime upgrade).
        #[arg(short = 'u', long)]
        upgrade: bool,
        /// Run in the background.
        #[arg(short = 'd', long)]
        daemon: bool,
    },
    /// Validate a config file and print the effective config.
    Check {
        #[arg(short = 'c', long = "conf")]
        config: PathBuf,
    },
    /// Validate a config file and signal the running weir (via its pid file) to reload it.
    Reload {
        #[arg(short = 'c', long = "conf", default_value = "conf/weir.yaml")]
        config: PathBuf,
    },
    /// Print the native YAML equivalent of a ServiceQ sq.properties file.
    Convert { file: PathBuf },
    /// Built-in demo: three local upstreams (node 3 cycles through crash, hang and pause),
    /// the gateway, and a light load of its own.
    Demo {
        #[arg(long, default_value = "127.0.0.1:5252")]
        listen: String,
        /// Do not send the demo's own load (send your own).
        #[arg(long)]
        no_load: bool,
        /// Length of each phase of node 3's cycle (e.g. 10s).
        #[arg(long, default_value = "10s", value_parser = parse_phase)]
        phase: std::time::Duration,
    },
}

fn parse_phase(s: &str) -> Result<std::time::Duration, String> {
    weir::config::units::positive_duration::parse(s)
}

fn load(path: &std::path::Path) -> Result<Loaded, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("weir: {e}");
        ExitCode::from(1)
    })
}

fn print_warnings(path: &std::path::Path, warnings: &[ConfigWarning]) {
    for w in warnings {
        match w.line {
            Some(line) => eprintln!("weir: {}:{}: warning: {}", path.display(), line, w.message),
            None => eprintln!("weir: {}: warning: {}", path.display(), w.message),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            listen,
            upgrade,
            daemon,
        } => {
            let loaded = match load(&config) {
                Ok(l) => l,
                Err(code) => return code,
            };
            print_warnings(&config, &loaded.warnings);
            let mut cfg = loaded.config;
            let mut listen_override = None;
            if let Some(addr) = listen {
                let addr = match values::check_listen_addr(&addr) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("weir: --listen: {e}");
                        return ExitCode::from(2);
                    }
                };
                let tls = cfg.tls.is_some();
                cfg.listen = vec![weir::config::Listener { addr, tls }];
                listen_override = Some(cfg.listen.clone());
            }
            weir::init_logging(&cfg.log.level);
            let opts = RunOptions {
                upgrade,
                daemon,
                config_path: Some(config.clone()),
                listen_override,
            };
            match weir::server::build(cfg, &opts) {
                Ok(built) => built.server.run_forever(),
                Err(e) => {
                    eprintln!("weir: {}: {e}", config.display());
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { config } => {
            let loaded = match load(&config) {
                Ok(l) => l,
                Err(code) => return code,
            };
            print_warnings(&config, &loaded.warnings);
            match weir::server::check(&loaded.config) {
                Ok(warnings) => {
                    for w in warnings {
                        eprintln!("weir: {}: warning: {w}", config.display());
                    }
                }
                Err(e) => {
                    eprintln!("weir: {}: {e}", config.display());
                    return ExitCode::from(1);
                }
            }
            print!("{}", loaded.config.to_yaml());
            // On stderr: stdout stays the config alone, as `weir convert` prints it.
            eprint!("{}", loaded.config.routes_text());
            eprintln!("weir: {}: ok", config.display());
            ExitCode::SUCCESS
        }
        Command::Reload { config } => {
            let loaded = match load(&config) {
                Ok(l) => l,
                Err(code) => return code,
            };
            print_warnings(&config, &loaded.warnings);
            let pid_file = &loaded.config.server.pid_file;
            match signal_pid_file(pid_file, "HUP") {
                Ok(pid) => {
                    eprintln!("weir: {}: ok, sent SIGHUP to pid {pid}", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "weir: cannot signal the running weir ({}): {e}",
                        pid_file.display()
                    );
                    ExitCode::from(1)
                }
            }
        }
        Command::Convert { file } => {
            let loaded = match load(&file) {
                Ok(l) => l,
                Err(code) => return code,
            };
            print_warnings(&file, &loaded.warnings);
            print!("{}", loaded.config.to_yaml());
            ExitCode::SUCCESS
        }
        Command::Demo {
            listen,
            no_load,
            phase,
        } => match weir::demo::run(&weir::demo::DemoOptions {
            listen,
            load: !no_load,
            phase,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weir demo: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// Sends `signal` (a name such as `HUP`) to the pid written in `pid_file`, with `kill(1)`, so
/// no unsafe code here.
fn signal_pid_file(pid_file: &std::path::Path, signal: &str) -> Result<u32, String> {
    let text = std::fs::read_to_string(pid_file).map_err(|e| e.to_string())?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("no pid in {text:?}"))?;
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if status.success() {
        Ok(pid)
    } else {
        Err(format!("no weir process {pid} (stale pid file?)"))
    }
}
