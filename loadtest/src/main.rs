use clap::Parser;
use loadtest::cli::{Cli, Command};
use loadtest::serve::Folder;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Command::Serve { dir, addr } = &cli.command {
        let served = async {
            let folder = Folder::load(dir)?;
            let names = folder.names();
            let (bound, task) = folder.serve(*addr).await?;
            println!("serving {} on http://{bound}/", dir.display());
            for name in names {
                println!("http://{bound}/{name}");
            }
            Ok::<_, loadtest::error::LoadError>(task)
        };
        match served.await {
            Ok(task) => {
                tokio::select! {
                    _ = task => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                eprintln!("loadtest: {e}");
                std::process::exit(2);
            }
        }
        return;
    }
    match loadtest::execute(cli.command).await {
        Ok((report, json)) if json => match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("loadtest: cannot write the report as JSON: {e}");
                std::process::exit(1);
            }
        },
        Ok((report, _)) => print!("{report}"),
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::exit(2);
        }
    }
}
