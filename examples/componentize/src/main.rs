//! `componentize`: wraps a WASI preview-1 command module (a core wasm module
//! exporting `_start` and importing `wasi_snapshot_preview1`) into a WASI
//! preview-2 command component, using the preview-1 command adapter that
//! matches wasmtime 48.
//!
//! Usage: `componentize <input-core-module.wasm> <output-component.wasm>`
//!
//! `examples/build.sh` uses it to build `examples/hello_component.wasm` from
//! `examples/hello.wasm`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER;
use wit_component::ComponentEncoder;

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: componentize <input-core-module.wasm> <output-component.wasm>");
    };

    let module = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    if is_component(&module) {
        bail!("{} is already a component", input.display());
    }

    let component = ComponentEncoder::default()
        .module(&module)
        .with_context(|| format!("{} is not a usable core module", input.display()))?
        .adapter(
            "wasi_snapshot_preview1",
            WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
        )
        .context("loading the wasi_snapshot_preview1 command adapter")?
        // Validate the resulting component before writing it.
        .validate(true)
        .encode()
        .with_context(|| format!("componentizing {}", input.display()))?;

    std::fs::write(output, &component).with_context(|| format!("writing {}", output.display()))?;
    eprintln!(
        "componentize: {} ({} bytes) -> {} ({} bytes)",
        input.display(),
        module.len(),
        output.display(),
        component.len()
    );
    Ok(())
}

/// A wasm binary starts with `\0asm` and a 4-byte version/layer field; layer 1
/// (bytes 6..8 == [1, 0]) marks a component rather than a core module.
fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[0..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}
