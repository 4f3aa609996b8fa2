//! The `cleanroom` binary: all behaviour lives in the library.

fn main() -> std::process::ExitCode {
    cleanroom::cli::main()
}
