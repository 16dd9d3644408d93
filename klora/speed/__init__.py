"""What makes klora's training steps fast: cheaper dropout masks, attention on every CPU
core, activation rematerialization, compilations kept between runs, and running scripts
under tcmalloc.

- `fast_dropout`: `FastDropout` and the hashed-mask `dropout` the LoRA layers use;
- `fast_attention`: `FastMultiHeadAttention`;
- `fast_layers`: swapping a model's Keras layers for those two and back;
- `remat`: `enable_remat` / `disable_remat`;
- `compile_cache`: `enable_compile_cache` (JAX's persistent cache) and `CompileTime`;
- `allocator`: `keep_freed_memory`, glibc reusing freed blocks in a running process;
- `tcmalloc`: relaunching a script under tcmalloc.
"""

from klora.speed.allocator import keep_freed_memory
from klora.speed.compile_cache import CompileTime, enable_compile_cache
from klora.speed.fast_attention import FastMultiHeadAttention
from klora.speed.fast_dropout import FastDropout
from klora.speed.remat import disable_remat, enable_remat
