//! Entry point: parse the command line, set up logging, run the subcommand.

use std::process::ExitCode;

use clap::Parser;
use natter::{
    auth::Signer,
    cli::{Cli, Command},
    db,
    gateway::Gateway,
    ids::UserId,
    shutdown, telemetry,
};
use tokio_util::sync::CancellationToken;

/// jemalloc, with its background threads returning freed pages to the OS:
/// idle gateway RSS per connection 7.0 → 6.3 KiB and gateway CPU per
/// delivery −3 to −5 % against glibc malloc (BENCHMARKS.md, issue 6).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(&cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("natter: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natter: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Gateway(settings) => {
            let stop = CancellationToken::new();
            shutdown::on_signal(stop.clone());
            Gateway::build(*settings).await?.run_until_stopped(stop).await
        }
        Command::Notifier(settings) => {
            let stop = CancellationToken::new();
            shutdown::on_signal(stop.clone());
            natter::notifier::run(*settings, stop).await
        }
        Command::PushEmulator(settings) => {
            let stop = CancellationToken::new();
            shutdown::on_signal(stop.clone());
            natter::push::emulator::run(settings, stop).await
        }
        Command::Migrate(s) => {
            let applied = db::migrate(&s.db).await?;
            eprintln!("natter: migrations up to date ({applied} applied now)");
            Ok(())
        }
        Command::Bench(s) => natter::bench::run(s).await,
        Command::Token(s) => {
            let user = UserId::parse(&s.user).map_err(|e| anyhow::anyhow!("--user: {e}"))?;
            let signer = Signer::from_settings(&s.jwt, s.jwt_private_key.as_deref())?;
            println!("{}", signer.mint(user.as_str(), s.ttl, s.name)?);
            Ok(())
        }
    }
}
