;; hostile/import.wat - a module that imports a function no sandbox provides.
;;
;; Instantiation must fail with a clear "unknown import" error before any guest
;; code runs. Built with: wat2wasm import.wat -o import.wasm
(module
  (import "env" "launch_missiles" (func $launch_missiles (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $launch_missiles (i32.const 42)))))
