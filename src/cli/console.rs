//! `cleanroom console`: the web console on this machine.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::ConnectArgs;

#[derive(Debug, Args)]
pub(super) struct ConsoleArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Where the console listens: a loopback address of this machine (port 0
    /// picks a free one).
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
}

pub(super) fn run(args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    if !args.listen.ip().is_loopback() {
        return Err(super::Usage(
            "--listen must be a loopback address (127.0.0.1 or ::1): the console is for this machine only",
        )
        .into());
    }
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let org = rt.block_on(client.who_am_i())?.organisation;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let token = crate::console::new_token();
    // The address with its token is for the person who started the
    // console: printed on its terminal, never logged.
    // A closed standard output (a caller that read the address and left)
    // does not stop the console.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "console for {org}: http://{addr}/?token={token}");
    let _ = out.flush();
    eprintln!("open it in a browser on this machine; Ctrl-C (or SIGTERM) stops the console");
    rt.block_on(crate::console::serve(
        listener,
        client,
        org,
        token,
        super::serve::shutdown_signal(),
    ))
    .context("serving the console")?;
    Ok(ExitCode::SUCCESS)
}
