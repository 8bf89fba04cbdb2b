//! The `mpkvirt-host` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mpkvirt::Mode;
use mpkvirt_host::info::Report;

#[derive(Parser, Debug)]
#[command(
    name = "mpkvirt-host",
    version,
    about = "A serverless host on MPK virtual domains"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Report PKU support (CPU and kernel), the backend that would be chosen, and keys.
    Info {
        /// Backend mode (default: MPKVIRT_MODE, else auto).
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ModeArg {
    Auto,
    Hardware,
    Emulated,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Info { mode } => {
            let mode = match mode {
                Some(ModeArg::Auto) => Mode::Auto,
                Some(ModeArg::Hardware) => Mode::Hardware,
                Some(ModeArg::Emulated) => Mode::Emulated,
                None => match mpkvirt::Config::from_env() {
                    Ok(c) => c.mode,
                    Err(e) => {
                        eprintln!("mpkvirt-host: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            let report = Report::probe(mode);
            print!("{report}");
            if report.backend.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
