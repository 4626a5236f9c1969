//! The `watchalong` command line: parses the arguments, loads the configuration, starts
//! the runtime and hands the command to [`watchalong::cli::run`]. This is an edge: errors
//! become one line and an exit code. Commands and their output live in `src/cli/`.

use std::process::ExitCode;

use clap::Parser;

use watchalong::base::config::{Config, ConfigError};
use watchalong::cli::{args::Cli, run};

/// sysexits' EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a restart loop.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match rt.block_on(run::run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
