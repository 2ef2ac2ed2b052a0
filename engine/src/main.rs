use std::process::ExitCode;

fn main() -> ExitCode {
    refract::cli::main()
}
