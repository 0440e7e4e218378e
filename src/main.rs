use std::process::ExitCode;

fn main() -> ExitCode {
    match rlhf_kernels::cli::parse_and_run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
