//! The `hush` command. Subcommands arrive with the aggregator, shuffler and demo issues.

fn main() {
    eprintln!("hush: no subcommands are built yet; see README.md for what exists");
    std::process::exit(2);
}
