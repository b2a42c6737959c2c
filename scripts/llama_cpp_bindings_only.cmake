# Injected into llama-cpp-python's build right after llama.cpp's project() call (see the Makefile's
# CMAKE_ARGS). The Python bindings load libllama and the ggml libraries only; llama.cpp's "common"
# library (argument parsing, chat-format parsers, about 50 of the 140 compile steps) ships with the
# wheel but nothing imports it. A directory-scope variable takes precedence over the cache entry the
# bindings force on, so common is not configured; on 2 cores the build drops from ~4.4 to ~2.0 min.
set(LLAMA_BUILD_COMMON OFF)
