/*
 * edgechat: the chat guest of edgebundle (wasm32-wasi).
 *
 * It stays dumb on purpose: prompt templates, stop strings and sampling options
 * live in the orchestrator. The guest loads the preloaded graph by alias, then
 * serves requests from stdin and streams pieces to stdout, one process for many
 * requests so the model loads once. It imports only functions the WasmEdge
 * WASI-NN GGML plugin has, so it runs unchanged on genuine WasmEdge and on the
 * embedded runtime (edgebundle exec).
 *
 * argv:   edgechat.wasm [--model-alias NAME] [--config JSON]
 * stdout: READY <graph> <ctx>\n            after loading, or
 *         FATAL <errno> <message>\n        and exit 1
 * stdin:  REQ <prompt_len> <meta_len> <max_tokens>\n <prompt bytes> <meta bytes>
 * stdout: D <n>\n <n bytes>                 one per generated piece
 *         END <reason> <errno> <info_len>\n <info bytes>
 *         reason: eos | length | context_full | prompt_too_long | cancelled | error
 * stdin:  STOP\n while a request runs ends it (reason cancelled) after the
 *         current piece; an idle STOP is ignored. EOF on stdin mid-request
 *         also ends it (nobody is reading).
 * EOF on stdin: exit 0. A malformed header line answers END error 1 0.
 *
 * Framing: with EDGECHAT_FRAME=<token> in its environment (1-64 letters or
 * digits; the orchestrator picks a random one per launch), every line above
 * that the guest writes starts with "<token> ". The runtime shares stdout:
 * genuine WasmEdge's WASI-NN plugin logs its errors there, and a log line may
 * quote a client's prompt. The orchestrator takes only framed lines as the
 * protocol and everything else as the runtime's log.
 *
 * Build: see Makefile (clang --target=wasm32-wasi -O2 -Wl,--strip-all).
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NN_IMPORT(name) \
    __attribute__((import_module("wasi_ephemeral_nn"), import_name(name)))

/* The plugin's ABI: every parameter and result is an i32. */
NN_IMPORT("load_by_name")
int32_t nn_load_by_name(const char *name, uint32_t name_len, uint32_t *graph);
NN_IMPORT("load_by_name_with_config")
int32_t nn_load_by_name_with_config(const char *name, uint32_t name_len,
                                    const char *config, uint32_t config_len,
                                    uint32_t *graph);
NN_IMPORT("init_execution_context")
int32_t nn_init_execution_context(uint32_t graph, uint32_t *ctx);
NN_IMPORT("set_input")
int32_t nn_set_input(uint32_t ctx, uint32_t index, const void *tensor);
NN_IMPORT("compute_single")
int32_t nn_compute_single(uint32_t ctx);
NN_IMPORT("get_output_single")
int32_t nn_get_output_single(uint32_t ctx, uint32_t index, uint8_t *buf,
                             uint32_t buf_max, uint32_t *written);
NN_IMPORT("fini_single")
int32_t nn_fini_single(uint32_t ctx);
NN_IMPORT("get_output")
int32_t nn_get_output(uint32_t ctx, uint32_t index, uint8_t *buf,
                      uint32_t buf_max, uint32_t *written);

enum {
    NN_OK = 0,
    NN_INVALID_ARGUMENT = 1,
    NN_TOO_LARGE = 7,
    NN_NOT_FOUND = 8,
    NN_END_OF_SEQUENCE = 100,
    NN_CONTEXT_FULL = 101,
    NN_PROMPT_TOO_LONG = 102,
    NN_MODEL_NOT_FOUND = 103,
};

/* Tensor as the plugin reads it: 20 bytes, type U8 = 3 (padding zeroed). */
typedef struct {
    const uint32_t *dims;
    uint32_t dims_len;
    uint32_t type;
    const uint8_t *data;
    uint32_t data_len;
} nn_tensor;

#define TENSOR_U8 3u
#define HEADER_MAX 128
#define PAYLOAD_MAX (256u * 1024u * 1024u) /* larger payloads are refused */

/* ---- output: whole events with one write each, so nothing waits in a buffer */

static void write_all(const void *data, size_t len) {
    const uint8_t *p = data;
    while (len > 0) {
        ssize_t n = write(STDOUT_FILENO, p, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            _exit(1); /* the reader is gone: nothing left to serve */
        }
        p += n;
        len -= (size_t)n;
    }
}

static uint8_t *event_buf;
static size_t event_cap;
static char frame[80]; /* "<token> ", or empty without EDGECHAT_FRAME */
static size_t frame_len;

/* Writes the frame, a header line and its payload with a single write. */
static void emit(const char *header, size_t header_len, const uint8_t *data,
                 size_t len) {
    size_t need = frame_len + header_len + len;
    if (need > event_cap) {
        uint8_t *grown = realloc(event_buf, need);
        if (grown == NULL) { /* fall back to three writes */
            write_all(frame, frame_len);
            write_all(header, header_len);
            write_all(data, len);
            return;
        }
        event_buf = grown;
        event_cap = need;
    }
    memcpy(event_buf, frame, frame_len);
    memcpy(event_buf + frame_len, header, header_len);
    if (len > 0) memcpy(event_buf + frame_len + header_len, data, len);
    write_all(event_buf, need);
}

static void emit_line(const char *line) { emit(line, strlen(line), NULL, 0); }

/* 0 when EDGECHAT_FRAME is absent or usable (then every line carries it). */
static int set_frame(void) {
    const char *token = getenv("EDGECHAT_FRAME");
    if (token == NULL || *token == '\0') return 0;
    size_t n = strlen(token);
    if (n > 64) return -1;
    for (size_t i = 0; i < n; i++) {
        char c = token[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')))
            return -1;
    }
    snprintf(frame, sizeof frame, "%s ", token);
    frame_len = n + 1;
    return 0;
}

static void emit_end(const char *reason, int32_t err, const uint8_t *info,
                     uint32_t info_len) {
    char header[HEADER_MAX];
    int n = snprintf(header, sizeof header, "END %s %d %u\n", reason, (int)err,
                     (unsigned)info_len);
    emit(header, (size_t)n, info, info_len);
}

/* ---- input: a small buffered reader over fd 0 (binary safe) ---- */

static uint8_t in_buf[64 * 1024];
static size_t in_pos, in_len;

/* Fills the buffer. 0 on success, -1 at end of input. */
static int refill(void) {
    ssize_t n;
    do {
        n = read(STDIN_FILENO, in_buf, sizeof in_buf);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) return -1;
    in_pos = 0;
    in_len = (size_t)n;
    return 0;
}

/* Returns the next byte or -1 at end of input. */
static int next_byte(void) {
    if (in_pos == in_len && refill() != 0) return -1;
    return in_buf[in_pos++];
}

/* Copies exactly len bytes to dst (NULL: skips them). 0 on success. */
static int read_exact(uint8_t *dst, size_t len) {
    while (len > 0) {
        if (in_pos == in_len && refill() != 0) return -1;
        size_t take = in_len - in_pos;
        if (take > len) take = len;
        if (dst != NULL) {
            memcpy(dst, in_buf + in_pos, take);
            dst += take;
        }
        in_pos += take;
        len -= take;
    }
    return 0;
}

/* Reads one line without its '\n'. Returns its length, -1 at end of input,
 * -2 if it did not fit (the rest of the line is consumed). */
static int read_line(char *line, size_t cap) {
    size_t n = 0;
    int too_long = 0;
    for (;;) {
        int c = next_byte();
        if (c < 0) {
            if (n == 0 && !too_long) return -1;
            break; /* a last line without '\n' */
        }
        if (c == '\n') break;
        if (n + 1 < cap) line[n++] = (char)c;
        else too_long = 1;
    }
    line[n] = '\0';
    return too_long ? -2 : (int)n;
}

/* Appends whatever is already waiting on fd 0, without blocking. 0 at EOF. */
static int read_ready(void) {
    struct pollfd ready = {STDIN_FILENO, POLLIN, 0};
    if (poll(&ready, 1, 0) <= 0 || (ready.revents & (POLLIN | POLLHUP)) == 0) return 1;
    if (in_pos > 0) { /* keep unread bytes: they may be the next request */
        memmove(in_buf, in_buf + in_pos, in_len - in_pos);
        in_len -= in_pos;
        in_pos = 0;
    }
    if (in_len == sizeof in_buf) return 1;
    ssize_t n = read(STDIN_FILENO, in_buf + in_len, sizeof in_buf - in_len);
    if (n == 0) return 0;
    if (n > 0) in_len += (size_t)n;
    return 1;
}

/* True when the orchestrator asked to stop the running request ("STOP\n"), or
 * closed stdin. Checked between tokens, so a stop costs at most one token. */
static int stop_requested(void) {
    static const char stop[] = "STOP\n";
    if (in_len - in_pos < sizeof stop - 1 && read_ready() == 0) return 1;
    if (in_len - in_pos >= sizeof stop - 1 &&
        memcmp(in_buf + in_pos, stop, sizeof stop - 1) == 0) {
        in_pos += sizeof stop - 1;
        return 1;
    }
    return 0;
}

/* Strict decimal parse of an unsigned 32-bit field; advances *s. */
static int parse_u32(const char **s, uint32_t *out) {
    const char *p = *s;
    uint64_t v = 0;
    if (*p < '0' || *p > '9') return -1;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (uint64_t)(*p - '0');
        if (v > UINT32_MAX) return -1;
        p++;
    }
    *out = (uint32_t)v;
    *s = p;
    return 0;
}

/* "REQ <prompt_len> <meta_len> <max_tokens>" */
static int parse_request(const char *line, uint32_t *prompt_len,
                         uint32_t *meta_len, uint32_t *max_tokens) {
    if (strncmp(line, "REQ ", 4) != 0) return -1;
    const char *p = line + 4;
    if (parse_u32(&p, prompt_len) != 0 || *p++ != ' ') return -1;
    if (parse_u32(&p, meta_len) != 0 || *p++ != ' ') return -1;
    if (parse_u32(&p, max_tokens) != 0 || *p != '\0') return -1;
    return 0;
}

/* ---- WASI-NN helpers ---- */

static int32_t set_bytes(uint32_t ctx, uint32_t index, const uint8_t *data,
                         uint32_t len) {
    static const uint32_t dims[1] = {1};
    nn_tensor tensor = {dims, 1, TENSOR_U8, data, len};
    return nn_set_input(ctx, index, &tensor);
}

typedef int32_t (*output_fn)(uint32_t, uint32_t, uint8_t *, uint32_t,
                             uint32_t *);

/* Fetches an output into *buf, growing it when the host answers "too large"
 * with the size it needs. */
static int32_t fetch(output_fn fn, uint32_t ctx, uint32_t index, uint8_t **buf,
                     uint32_t *cap, uint32_t *len) {
    for (int attempt = 0; attempt < 4; attempt++) {
        uint32_t written = 0;
        int32_t rc = fn(ctx, index, *buf, *cap, &written);
        if (rc == NN_TOO_LARGE && written > *cap) {
            uint8_t *grown = realloc(*buf, written);
            if (grown == NULL) return rc;
            *buf = grown;
            *cap = written;
            continue;
        }
        if (rc == NN_OK && written > *cap) return NN_TOO_LARGE;
        *len = rc == NN_OK ? written : 0;
        return rc;
    }
    return NN_TOO_LARGE;
}

static uint8_t *piece_buf, *info_buf;
static uint32_t piece_cap = 4096, info_cap = 4096;

/* One request: stream pieces until the end, then report why it ended. */
static void serve(uint32_t ctx, const uint8_t *prompt, uint32_t prompt_len,
                  const uint8_t *meta, uint32_t meta_len, uint32_t max_tokens) {
    const char *reason = "error";
    int32_t err = NN_OK;
    int started = 0;

    if (meta_len > 0) err = set_bytes(ctx, 1, meta, meta_len);
    if (err == NN_OK) err = set_bytes(ctx, 0, prompt, prompt_len);
    if (err == NN_OK) {
        started = 1;
        uint32_t count = 0;
        for (;;) {
            if (max_tokens > 0 && count >= max_tokens) {
                reason = "length";
                break;
            }
            err = nn_compute_single(ctx);
            if (err == NN_OK) {
                uint32_t n = 0;
                err = fetch(nn_get_output_single, ctx, 0, &piece_buf, &piece_cap,
                            &n);
                if (err != NN_OK) break;
                char header[32];
                int h = snprintf(header, sizeof header, "D %u\n", (unsigned)n);
                emit(header, (size_t)h, piece_buf, n);
                count++;
                if (stop_requested()) {
                    reason = "cancelled";
                    break;
                }
                continue;
            }
            if (err == NN_END_OF_SEQUENCE) reason = "eos";
            else if (err == NN_CONTEXT_FULL) reason = "context_full";
            else if (err == NN_PROMPT_TOO_LONG) reason = "prompt_too_long";
            break;
        }
    }
    /* The plugin's fini_single clears the output tokens the info counts, so
     * the info is read first. */
    uint32_t info_len = 0;
    if (fetch(nn_get_output, ctx, 1, &info_buf, &info_cap, &info_len) != NN_OK)
        info_len = 0;
    if (started) nn_fini_single(ctx);
    emit_end(reason, err, info_buf, info_len);
}

static void fatal(int32_t err, const char *message) {
    char line[512];
    snprintf(line, sizeof line, "FATAL %d %s\n", (int)err, message);
    emit_line(line);
    exit(1);
}

int main(int argc, char **argv) {
    const char *alias = "default";
    const char *config = NULL;
    if (set_frame() != 0)
        fatal(NN_INVALID_ARGUMENT, "EDGECHAT_FRAME must be 1-64 letters or digits");
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model-alias") == 0 && i + 1 < argc) {
            alias = argv[++i];
        } else if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) {
            config = argv[++i];
        } else {
            char message[256];
            snprintf(message, sizeof message,
                     "unknown argument %.160s (usage: edgechat.wasm "
                     "[--model-alias NAME] [--config JSON])",
                     argv[i]);
            fatal(NN_INVALID_ARGUMENT, message);
        }
    }

    uint32_t graph = 0, ctx = 0;
    int32_t err = config != NULL
        ? nn_load_by_name_with_config(alias, (uint32_t)strlen(alias), config,
                                      (uint32_t)strlen(config), &graph)
        : nn_load_by_name(alias, (uint32_t)strlen(alias), &graph);
    if (err != NN_OK) {
        char message[256];
        if (err == NN_NOT_FOUND)
            snprintf(message, sizeof message,
                     "no preloaded model named %.100s (give --nn-preload "
                     "%.100s:GGML:AUTO:<model.gguf>)",
                     alias, alias);
        else if (err == NN_MODEL_NOT_FOUND)
            snprintf(message, sizeof message,
                     "the model file preloaded as %.100s does not exist", alias);
        else
            snprintf(message, sizeof message, "loading model %.100s failed",
                     alias);
        fatal(err, message);
    }
    err = nn_init_execution_context(graph, &ctx);
    if (err != NN_OK) fatal(err, "init_execution_context failed");

    piece_buf = malloc(piece_cap);
    info_buf = malloc(info_cap);
    if (piece_buf == NULL || info_buf == NULL) fatal(NN_INVALID_ARGUMENT, "out of memory");

    char line[HEADER_MAX];
    snprintf(line, sizeof line, "READY %u %u\n", (unsigned)graph, (unsigned)ctx);
    emit_line(line);

    for (;;) {
        int n = read_line(line, sizeof line);
        if (n == -1) return 0; /* end of input */
        if (strcmp(line, "STOP") == 0) continue; /* arrived after its request ended */
        uint32_t prompt_len, meta_len, max_tokens;
        if (n < 0 || parse_request(line, &prompt_len, &meta_len, &max_tokens) != 0) {
            emit_end("error", NN_INVALID_ARGUMENT, NULL, 0);
            continue;
        }
        uint64_t total = (uint64_t)prompt_len + meta_len;
        uint8_t *body = total <= PAYLOAD_MAX ? malloc(total ? total : 1) : NULL;
        if (body == NULL) { /* keep the stream in step: skip the payload */
            int eof = read_exact(NULL, prompt_len) != 0 || read_exact(NULL, meta_len) != 0;
            emit_end("error", NN_TOO_LARGE, NULL, 0);
            if (eof) return 0;
            continue;
        }
        if (read_exact(body, total) != 0) {
            free(body);
            emit_end("error", NN_INVALID_ARGUMENT, NULL, 0);
            return 0; /* input ended inside a request */
        }
        serve(ctx, body, prompt_len, body + prompt_len, meta_len, max_tokens);
        free(body);
    }
}
