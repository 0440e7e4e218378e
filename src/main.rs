use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = rlhf_kernels::cli::Cli::parse();
    match rlhf_kernels::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
