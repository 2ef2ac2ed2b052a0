use std::process::ExitCode;

// Allocation-heavy request handling on few cores: mimalloc is markedly cheaper than the system one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    refract::cli::main()
}
