//! The `prm` command: PRM transfer attacks on CLIP vision encoders.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
