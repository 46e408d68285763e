import logging

# bitsandbytes (QLoRA; imported by peft whenever it is installed) warns on every import, on CPUs with AVX512-BF16,
# that an optional faster CPU kernel package is missing; its plain 4-bit kernels serve us.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
