//! spare's patches to the Cranelift code generator (`vendor/README.md`) change
//! no result, only speed, so losing one (a dropped `[patch]`, an upgrade that
//! forgot it) would pass every other test. These compile small functions with
//! the x86-64 backend exactly as wasmtime links it and check the machine code.
#![cfg(target_arch = "x86_64")]

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::{AbiParam, Function, InstBuilder, Signature, UserFuncName, types};
use cranelift_codegen::isa::{CallConv, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{CompiledCode, Context};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

fn x86_64() -> OwnedTargetIsa {
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").unwrap();
    flags.enable("machine_code_cfg_info").unwrap();
    cranelift_codegen::isa::lookup_by_name("x86_64-unknown-linux-gnu")
        .unwrap()
        .finish(settings::Flags::new(flags))
        .unwrap()
}

fn compile(isa: &OwnedTargetIsa, func: Function) -> CompiledCode {
    let mut ctx = Context::for_function(func);
    ctx.set_disasm(true);
    ctx.compile(&**isa, &mut ControlPlane::default())
        .map_err(|e| format!("{:?}", e.inner))
        .unwrap()
        .clone()
}

fn signature(params: &[types::Type], returns: &[types::Type]) -> Signature {
    let mut sig = Signature::new(CallConv::SystemV);
    sig.params.extend(params.iter().map(|&t| AbiParam::new(t)));
    sig.returns
        .extend(returns.iter().map(|&t| AbiParam::new(t)));
    sig
}

/// A counting loop after `steps` multiply-rotate steps (11 bytes each), so
/// that the code before the loop ends at a different offset for each
/// `steps`: with 5 it ends exactly on a 64-byte line with a jump to the loop,
/// the case where binding the loop's label would remove that jump and move
/// the loop back off the line.
fn loop_after(isa: &OwnedTargetIsa, steps: i64) -> CompiledCode {
    let mut func = Function::with_name_signature(
        UserFuncName::testcase("loop"),
        signature(&[types::I64, types::I64], &[types::I64]),
    );
    let mut fctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut func, &mut fctx);
    let entry = b.create_block();
    let head = b.create_block();
    let exit = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.append_block_param(head, types::I64);
    b.append_block_param(head, types::I64);
    b.switch_to_block(entry);
    let n = b.block_params(entry)[0];
    let mut acc = b.block_params(entry)[1];
    for k in 0..steps {
        acc = b.ins().imul_imm_s(acc, 0x1234_5679 + k);
        acc = b.ins().rotl_imm_u(acc, 13);
    }
    b.ins().jump(head, &[n.into(), acc.into()]);
    b.switch_to_block(head);
    let i = b.block_params(head)[0];
    let acc = b.block_params(head)[1];
    let acc = b.ins().bxor(acc, i);
    let acc = b.ins().imul_imm_u(acc, 0x9e37_79b9);
    let i = b.ins().iadd_imm_s(i, -1);
    b.ins()
        .brif(i, head, &[i.into(), acc.into()], exit, &[acc.into()]);
    let result = b.append_block_param(exit, types::I64);
    b.switch_to_block(exit);
    b.ins().return_(&[result]);
    b.seal_all_blocks();
    b.finalize(isa.frontend_config());
    compile(isa, func)
}

#[test]
fn loop_heads_start_on_a_64_byte_line() {
    let isa = x86_64();
    for steps in 0..12 {
        let code = loop_after(&isa, steps);
        // Edges of the machine code's control-flow graph, as (block start,
        // target): a target at or before its source is a loop head.
        let heads: Vec<u32> = code
            .bb_edges
            .iter()
            .filter(|(from, to)| to <= from)
            .map(|&(_, to)| to)
            .collect();
        let &[head] = heads.as_slice() else {
            panic!("{steps} steps: one loop head expected, found {heads:?}");
        };
        assert_eq!(
            head % 64,
            0,
            "{steps} steps: loop head at {head}:\n{:?}",
            code.vcode
        );
        // Offsets within the function mean nothing unless it is aligned too.
        assert!(code.buffer.alignment >= 64, "{}", code.buffer.alignment);
        // What precedes the loop ends in NOP padding (`0f 1f ..`, `66 0f
        // 1f ..`, `66 90` or `90`).
        let before = &code.buffer.data()[..head as usize];
        let tail = &before[before.len().saturating_sub(12)..];
        assert!(
            tail.ends_with(&[0x90]) || tail.windows(2).any(|w| w == [0x0f, 0x1f]),
            "{steps} steps: no NOP padding before the loop: {tail:02x?}"
        );
    }
}

/// A function with no loop is not padded or over-aligned.
#[test]
fn straight_line_code_is_not_padded() {
    let isa = x86_64();
    let mut func = Function::with_name_signature(
        UserFuncName::testcase("straight"),
        signature(&[types::I64], &[types::I64]),
    );
    let mut fctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut func, &mut fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let x = b.block_params(entry)[0];
    let y = b.ins().imul_imm_s(x, 3);
    b.ins().return_(&[y]);
    b.seal_all_blocks();
    b.finalize(isa.frontend_config());

    let code = compile(&isa, func);
    assert!(code.buffer.alignment < 64, "{}", code.buffer.alignment);
    assert!(
        !code.buffer.data().contains(&0x90),
        "{:02x?}",
        code.buffer.data()
    );
}
