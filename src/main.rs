//! The `watchalong` command line: parses the arguments, loads the configuration, starts
//! the runtime and hands the command to [`watchalong::cli::run`]. This is an edge: errors
//! become one line and an exit code. Commands and their output live in `src/cli/`.

use std::process::ExitCode;

use clap::Parser;

use watchalong::base::config::{Config, ConfigError};
use watchalong::cli::{args::Cli, run};
#[cfg(feature = "generate")]
use watchalong::cli::{args::Command, generate};

/// sysexits' EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a restart loop.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // For packagers: needs no configuration (a package build has none).
    #[cfg(feature = "generate")]
    if let Command::Generate { what, dir } = &cli.command {
        return match generate::generate(*what, dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return match e {
                ConfigError::Invalid { .. } => ExitCode::from(EX_CONFIG),
                ConfigError::Read { .. } => ExitCode::from(EX_CONFIG),
            };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(run::run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Dropping the runtime would wait for every blocking task, however stuck: a
    // `mount`'s read of a file whose holder vanished, or its FUSE session's thread,
    // would keep the process alive after it said it stopped. The daemon awaits its own
    // work before `run` returns, so what is left here is only such strays.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    code
}
