//! Recognising WebAssembly binaries by their header, before anything heavier.

use serde::{Deserialize, Serialize};

/// What kind of WebAssembly binary a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WasmKind {
    /// A core module: WASI preview 1 programs (clang, Rust, Zig, TinyGo).
    Module,
    /// A component: WASI preview 2 programs.
    Component,
}

const MAGIC: &[u8; 4] = b"\0asm";
const MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];
/// Component-model binaries carry version 0x0d and layer 1.
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];

/// Identifies `bytes` as a module or a component, or says why it is neither.
pub fn sniff(bytes: &[u8]) -> Result<WasmKind, String> {
    if bytes.len() < 8 {
        return Err(format!(
            "{} bytes is too short to be WebAssembly",
            bytes.len()
        ));
    }
    if &bytes[..4] != MAGIC {
        return Err("it does not start with the WebAssembly magic bytes `\\0asm`".into());
    }
    match [bytes[4], bytes[5], bytes[6], bytes[7]] {
        MODULE_VERSION => Ok(WasmKind::Module),
        COMPONENT_VERSION => Ok(WasmKind::Component),
        other => Err(format!(
            "unsupported WebAssembly version/layer {:02x?}",
            other
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_modules_components_and_junk() {
        assert_eq!(sniff(b"\0asm\x01\0\0\0rest"), Ok(WasmKind::Module));
        assert_eq!(sniff(b"\0asm\x0d\0\x01\0"), Ok(WasmKind::Component));
        assert!(
            sniff(b"#!/bin/sh\necho hi\n")
                .unwrap_err()
                .contains("magic")
        );
        assert!(sniff(b"\0asm").unwrap_err().contains("too short"));
        assert!(sniff(b"\0asm\x02\0\0\0").unwrap_err().contains("version"));
    }
}
