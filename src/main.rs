//! The `cleanroom` binary: all behaviour lives in the library.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cleanroom::cli::main()
}
