/*
 * The telemetry of a response, read as Envoy streams it: the compiled twin of inspect.lua.
 *
 * Envoy loads this as a dynamic module (`envoy.filters.http.dynamic_modules`, filter name
 * "extproc_inspect") and calls it on its worker for every response frame. It finds what
 * inspect.lua finds, by the same rules and limits, and writes the same dynamic-metadata keys
 * (namespace "extproc"), which the gRPC access log carries to the sidecar; inspect.lua's header
 * says what each key means. Why it exists: a Lua filter costs Envoy a coroutine per response,
 * which on a fast machine is a fifth of what Envoy spends on a whole request; this costs a
 * function call per frame. tests/integration/test_inspector_live.py holds the two to the same
 * answers, byte streams a client could not craft on purpose included.
 *
 * One deliberate difference: an SSE line longer than HEAD_BYTES (inspect.lua would hold it whole,
 * however long) ends the search for answer text; the tail and timing are unaffected.
 *
 * Build: cc -O2 -shared -fPIC -o libextproc_inspect.so inspect.c (`extproc build-inspector`).
 * Nothing here allocates more than HEAD_BYTES + one frame per response, and every read of a
 * body is bounded by the length Envoy gave with it.
 */
#define _GNU_SOURCE /* memmem */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* --- the part of Envoy's dynamic-module ABI (Envoy 1.40, ABI v0.2.0) this filter uses ------ */

#define ABI_VERSION "v0.2.0"

typedef struct {
  const char *ptr;
  size_t length;
} buffer;

enum { RESPONSE_HEADER = 2 };       /* envoy_dynamic_module_type_http_header_type */
enum { RECEIVED_RESPONSE_BODY = 2 }; /* envoy_dynamic_module_type_http_body_type */
enum { CONTINUE = 0 };              /* every on_http_filter_*_status: Continue */

extern bool envoy_dynamic_module_callback_http_get_header(void *envoy, int type, buffer key,
                                                          buffer *result, size_t index,
                                                          size_t *count);
extern size_t envoy_dynamic_module_callback_http_get_body_chunks_size(void *envoy, int type);
extern bool envoy_dynamic_module_callback_http_get_body_chunks(void *envoy, int type,
                                                               buffer *chunks);
extern bool envoy_dynamic_module_callback_http_set_dynamic_metadata_string(void *envoy,
                                                                           buffer ns, buffer key,
                                                                           buffer value);
extern bool envoy_dynamic_module_callback_http_set_dynamic_metadata_number(void *envoy,
                                                                           buffer ns, buffer key,
                                                                           double value);
extern bool envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(void *envoy, buffer ns,
                                                                         buffer key, bool value);

#define EXPORT __attribute__((visibility("default")))
#define LIT(s) ((buffer){(s), sizeof(s) - 1})

/* --- limits, as in inspect.lua ------------------------------------------------------------- */

#define TEXT_BYTES 2400 /* the sidecar's SIGNAL_CHARS (600) at up to 4 bytes a character */
#define HEAD_BYTES 65536
#define TAIL_BYTES 1024

/* --- patterns: literal tokens with optional whitespace between them ------------------------ */

/* inspect.lua's patterns are all of this shape ('"content"%s*:%s*"' is {"\"content\"", ":",
 * "\""}), so a token list and one matcher replace Lua's pattern engine. */
typedef struct {
  const char *tok[4];
} pattern;

static const pattern CONTENT = {{"\"content\"", ":", "\""}};
static const pattern REFUSAL = {{"\"refusal\"", ":", "\""}};
static const pattern TOOL_CALLS = {{"\"tool_calls\"", ":", "[", "{"}};
static const pattern TEXT = {{"\"text\"", ":", "\""}};
static const pattern DELTA = {{"\"delta\"", ":", "\""}};
static const pattern OUTPUT_TEXT_DELTA = {{"\"response.output_text.delta\""}};
static const pattern OUTPUT_TEXT = {{"\"output_text\""}};
static const pattern FUNCTION_CALL = {{"\"type\"", ":", "\"function_call\""}};
static const pattern TEXT_DELTA = {{"\"text_delta\""}};
static const pattern TYPE_TEXT = {{"\"type\"", ":", "\"text\""}};
static const pattern TOOL_USE = {{"\"type\"", ":", "\"tool_use\""}};
static const pattern OBJECT = {{"\"object\"", ":", "\""}};
static const pattern TYPE = {{"\"type\"", ":", "\""}};
static const pattern CHOICES = {{"\"choices\""}};
static const pattern DELTA_OBJECT = {{"\"delta\"", ":", "{"}};
static const pattern MESSAGE_OBJECT = {{"\"message\"", ":", "{"}};
static const pattern TEXT_KEY = {{"\"text\"", ":"}};
static const pattern CACHED = {{"\"cache_read_input_tokens\"", ":"}};
static const pattern INPUT = {{"\"input_tokens\"", ":"}};
static const pattern OUTPUT = {{"\"output_tokens\"", ":"}};
static const pattern PROMPT = {{"\"prompt_tokens\"", ":"}};
static const pattern COMPLETION = {{"\"completion_tokens\"", ":"}};
static const pattern CACHED_TOKENS = {{"\"cached_tokens\"", ":"}};
static const pattern FINISH = {{"\"finish_reason\"", ":", "\""}};
static const pattern STOP = {{"\"stop_reason\"", ":", "\""}};

static bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

/* The end of p matched at s[at], or 0 when it does not match there (a match never ends at 0). */
static size_t match_at(const char *s, size_t n, size_t at, const pattern *p) {
  for (int i = 0; i < 4 && p->tok[i]; i++) {
    if (i > 0)
      while (at < n && is_space(s[at])) at++;
    size_t k = strlen(p->tok[i]);
    if (k > n - at || memcmp(s + at, p->tok[i], k) != 0) return 0;
    at += k;
  }
  return at;
}

/* The first match of p in s at or after from: true with its start and end. */
static bool find(const char *s, size_t n, size_t from, const pattern *p, size_t *start,
                 size_t *end) {
  size_t k = strlen(p->tok[0]);
  while (from < n) {
    const char *hit = memmem(s + from, n - from, p->tok[0], k);
    if (hit == NULL) return false;
    size_t at = (size_t)(hit - s);
    size_t e = match_at(s, n, at, p);
    if (e) {
      *start = at;
      *end = e;
      return true;
    }
    from = at + 1;
  }
  return false;
}

static bool contains(const char *s, size_t n, const pattern *p) {
  size_t a, b;
  return find(s, n, 0, p, &a, &b);
}

static bool is_word(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '.';
}

/* The first value of a '"key"%s*:%s*"([%w_%.]*)"' in s: true with it in *value. */
static bool word_value(const char *s, size_t n, const pattern *p, buffer *value) {
  size_t from = 0, start, end;
  while (find(s, n, from, p, &start, &end)) {
    size_t i = end;
    while (i < n && is_word(s[i])) i++;
    if (i < n && s[i] == '"') {
      *value = (buffer){s + end, i - end};
      return true;
    }
    from = start + 1;
  }
  return false;
}

/* The first number of a '"key"%s*:%s*(%d+)' in s, else a negative number. */
static double number_value(const char *s, size_t n, const pattern *p) {
  size_t from = 0, start, end;
  while (find(s, n, from, p, &start, &end)) {
    while (end < n && is_space(s[end])) end++;
    double v = 0;
    size_t i = end;
    while (i < n && s[i] >= '0' && s[i] <= '9') v = v * 10 + (s[i++] - '0');
    if (i > end) return v;
    from = start + 1;
  }
  return -1;
}

/* 2^32: the counts are uint32 fields; a larger one is not believable. */
#define MAX_COUNT 4294967296.0
#define MAX_REASON 32

/* The number of the last '"key"%s*:%s*(%d+)' in s (with where that match starts), else false;
 * only believable numbers when so asked. Each match is sought from the character after the
 * previous one's start, as inspect.lua does. */
static bool last_number(const char *s, size_t n, const pattern *p, bool believable, double *value,
                        size_t *at) {
  size_t from = 0, start, end;
  bool found = false;
  while (find(s, n, from, p, &start, &end)) {
    while (end < n && is_space(s[end])) end++;
    double v = 0;
    size_t i = end;
    while (i < n && s[i] >= '0' && s[i] <= '9') v = v * 10 + (s[i++] - '0');
    if (i > end && (!believable || v < MAX_COUNT)) {
      *value = v;
      *at = start;
      found = true;
    }
    from = start + 1;
  }
  return found;
}

/* The value of the last '"key"%s*:%s*"([a-z_]+)"' in s of at most MAX_REASON characters. */
static bool last_reason(const char *s, size_t n, const pattern *p, buffer *value) {
  size_t from = 0, start, end;
  bool found = false;
  while (find(s, n, from, p, &start, &end)) {
    size_t i = end;
    while (i < n && ((s[i] >= 'a' && s[i] <= 'z') || s[i] == '_')) i++;
    if (i > end && i - end <= MAX_REASON && i < n && s[i] == '"') {
      *value = (buffer){s + end, i - end};
      found = true;
    }
    from = start + 1;
  }
  return found;
}

static bool equals(buffer b, const char *lit) {
  size_t k = strlen(lit);
  return b.length == k && memcmp(b.ptr, lit, k) == 0;
}

static bool starts(buffer b, const char *lit) {
  size_t k = strlen(lit);
  return b.length >= k && memcmp(b.ptr, lit, k) == 0;
}

/* --- formats ------------------------------------------------------------------------------- */

/* Where each API keeps its answer text; the fields mean what FORMATS in inspect.lua says. */
typedef struct {
  const char *name;
  const pattern *key, *sse, *sse_key, *json, *refusal, *tool;
  const pattern *prompt, *completion, *finish; /* the usage counts and the finish reason */
} format;

enum { CHAT, COMPLETIONS, RESPONSES, MESSAGES };

static const format FORMATS[] = {
    [CHAT] = {"chat", &CONTENT, NULL, NULL, NULL, &REFUSAL, &TOOL_CALLS, &PROMPT, &COMPLETION,
              &FINISH},
    [COMPLETIONS] = {"completions", &TEXT, NULL, NULL, NULL, NULL, NULL, &PROMPT, &COMPLETION,
                     &FINISH},
    [RESPONSES] = {"responses", &TEXT, &OUTPUT_TEXT_DELTA, &DELTA, &OUTPUT_TEXT, NULL,
                   &FUNCTION_CALL, &INPUT, &OUTPUT, NULL},
    [MESSAGES] = {"messages", &TEXT, &TEXT_DELTA, NULL, &TYPE_TEXT, NULL, &TOOL_USE, &INPUT,
                  &OUTPUT, &STOP},
};

/* The format s (whole SSE lines, or a body's head) shows, else NULL: by its first "object",
 * else its first "type", else the shape of its choices (inspect.lua's format_of). */
static const format *format_of(const char *s, size_t n) {
  buffer v;
  if (word_value(s, n, &OBJECT, &v)) {
    if (equals(v, "chat.completion") || equals(v, "chat.completion.chunk")) return &FORMATS[CHAT];
    if (equals(v, "text_completion")) return &FORMATS[COMPLETIONS];
    if (equals(v, "response")) return &FORMATS[RESPONSES];
  }
  bool typed = word_value(s, n, &TYPE, &v);
  if (typed && starts(v, "response.")) return &FORMATS[RESPONSES];
  if (typed && starts(v, "message")) return &FORMATS[MESSAGES];
  if (contains(s, n, &CHOICES)) { /* a server that names no "object" */
    if (contains(s, n, &DELTA_OBJECT) || contains(s, n, &MESSAGE_OBJECT))
      return &FORMATS[CHAT];
    if (contains(s, n, &TEXT_KEY)) return &FORMATS[COMPLETIONS];
  }
  return NULL;
}

/* --- one response ------------------------------------------------------------------------ */

typedef struct {
  buffer ns; /* the metadata namespace: the filter config's, else "extproc" */
  bool sse, done, stop_text;
  const format *fmt;
  double first_us; /* < 0: not yet */
  bool tools;
  double cached, prompt; /* < 0: not seen */
  size_t seen, held;     /* SSE bytes read for text; text bytes found (all of them) */
  size_t text_len;       /* bytes of text kept (at most TEXT_BYTES) */
  char text[TEXT_BYTES];
  char *pending; /* SSE: the unfinished last line; JSON: the body's head */
  size_t pending_len, pending_cap;
  bool cut; /* JSON: the body was longer than HEAD_BYTES */
  const char *answer;
  size_t answer_len;
  bool answered;
  size_t tail_len;
  char tail[TAIL_BYTES];
} response;

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec * 1e6 + (double)(ts.tv_nsec / 1000);
}

static bool reserve(response *r, size_t more) {
  if (r->pending_len + more <= r->pending_cap) return true;
  size_t cap = r->pending_cap ? r->pending_cap : 4096;
  while (cap < r->pending_len + more) cap *= 2;
  char *grown = realloc(r->pending, cap);
  if (grown == NULL) return false;
  r->pending = grown;
  r->pending_cap = cap;
  return true;
}

static void keep_tail(response *r, const char *s, size_t n) {
  if (n >= TAIL_BYTES) {
    memcpy(r->tail, s + n - TAIL_BYTES, TAIL_BYTES);
    r->tail_len = TAIL_BYTES;
    return;
  }
  size_t keep = r->tail_len + n > TAIL_BYTES ? TAIL_BYTES - n : r->tail_len;
  memmove(r->tail, r->tail + r->tail_len - keep, keep);
  memcpy(r->tail + keep, s, n);
  r->tail_len = keep + n;
}

typedef void (*on_string)(response *r, const char *piece, size_t n, bool unterminated);

/* Calls found for each string value of key (a pattern ending in the opening quote) in s that
 * follows an anchor (when given), still escaped; for an unterminated last one with
 * unterminated set. Escapes are skipped whole, so \" never ends a string. */
static void strings(response *r, const char *s, size_t n, const pattern *anchor,
                    const pattern *key, on_string found) {
  size_t pos = 0, a, b;
  for (;;) {
    if (anchor) {
      if (!find(s, n, pos, anchor, &a, &b)) return;
      pos = b;
    }
    if (!find(s, n, pos, key, &a, &b)) return;
    size_t i = b;
    for (;;) {
      while (i < n && s[i] != '"' && s[i] != '\\') i++;
      if (i >= n) {
        found(r, s + b, n - b, true);
        return;
      }
      if (s[i] == '"') {
        found(r, s + b, i - b, false);
        pos = i + 1;
        break;
      }
      i += 2;
    }
  }
}

static void keep_text(response *r, const char *piece, size_t n, bool unterminated) {
  (void)unterminated;
  if (n == 0) return;
  size_t room = TEXT_BYTES - r->text_len;
  size_t k = n < room ? n : room;
  memcpy(r->text + r->text_len, piece, k);
  r->text_len += k;
  r->held += n;
  if (r->first_us < 0) r->first_us = now_us();
}

static void first_answer(response *r, const char *piece, size_t n, bool unterminated) {
  if (!r->answered && (r->cut || !unterminated)) {
    r->answer = piece;
    r->answer_len = n;
    r->answered = true;
  }
}

/* SSE: whole lines of a frame, searched for format, text, tools and the early usage. */
static void read_lines(response *r, const char *lines, size_t n) {
  if (r->fmt == NULL) r->fmt = format_of(lines, n);
  const format *f = r->fmt;
  if (f == NULL) return;
  strings(r, lines, n, f->sse, f->sse_key ? f->sse_key : f->key, keep_text);
  if (f->refusal) strings(r, lines, n, NULL, f->refusal, keep_text);
  if (f == &FORMATS[MESSAGES]) {
    if (r->cached < 0) r->cached = number_value(lines, n, &CACHED);
    if (r->prompt < 0) r->prompt = number_value(lines, n, &INPUT);
  }
  if (f->tool && !r->tools && contains(lines, n, f->tool)) {
    r->tools = true;
    if (r->first_us < 0) r->first_us = now_us();
  }
}

/* One frame of the body, in the slices Envoy holds it in. */
static void read_frame(response *r, const buffer *slices, size_t count) {
  size_t n = 0;
  for (size_t i = 0; i < count; i++) n += slices[i].length;
  if (n == 0) return;
  if (r->sse && !r->stop_text && r->held < TEXT_BYTES && (r->fmt || r->seen < HEAD_BYTES)) {
    if (!reserve(r, n)) {
      r->stop_text = true;
    } else {
      for (size_t i = 0; i < count; i++) {
        memcpy(r->pending + r->pending_len, slices[i].ptr, slices[i].length);
        r->pending_len += slices[i].length;
      }
      r->seen += n;
      size_t last = r->pending_len;
      while (last > 0 && r->pending[last - 1] != '\n') last--;
      if (last > 0) read_lines(r, r->pending, last);
      memmove(r->pending, r->pending + last, r->pending_len - last);
      r->pending_len -= last;
      if (r->pending_len > HEAD_BYTES) r->stop_text = true;
    }
  } else if (!r->sse) {
    if (r->first_us < 0) r->first_us = now_us();
    size_t room = HEAD_BYTES - r->pending_len;
    size_t k = n < room ? n : room;
    if (k < n) r->cut = true;
    if (k > 0 && reserve(r, k)) {
      for (size_t i = 0; i < count && k > 0; i++) {
        size_t m = slices[i].length < k ? slices[i].length : k;
        memcpy(r->pending + r->pending_len, slices[i].ptr, m);
        r->pending_len += m;
        k -= m;
      }
    } else if (k > 0) {
      r->cut = true;
    }
  }
  for (size_t i = 0; i < count; i++) keep_tail(r, slices[i].ptr, slices[i].length);
}

/* The length of the UTF-8 character at s (RFC 3629: no overlongs, surrogates or NUL), else 0. */
static size_t utf8_at(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t k = c != 0 && c < 0x80 ? 1 : c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3
           : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
  if (k == 0 || k > n) return 0;
  unsigned lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;
  unsigned hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
  for (size_t j = 1; j < k; j++) {
    if (s[j] < lo || s[j] > hi) return 0;
    lo = 0x80, hi = 0xBF;
  }
  return k;
}

/* Envoy hands these strings to the sidecar in protobuf string fields, which must be UTF-8: one
 * bad byte (the body's own, or a cut inside a character) would fail the whole access-log message
 * that carries it, and with it every other request's entry. So each byte that does not start a
 * valid character, and NUL (which Lua's filter cannot pass), is written as '?', as inspect.lua's
 * clean() does. At most TEXT_BYTES are written. */
static void set_string(void *envoy, const response *r, buffer key, const char *s, size_t n) {
  char out[TEXT_BYTES];
  size_t m = 0;
  for (size_t i = 0; i < n && m < TEXT_BYTES;) {
    size_t k = utf8_at((const unsigned char *)s + i, n - i);
    if (k == 0) {
      out[m++] = '?';
      i++;
    } else if (m + k <= TEXT_BYTES) {
      memcpy(out + m, s + i, k);
      m += k;
      i += k;
    } else {
      break;
    }
  }
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(envoy, r->ns, key,
                                                                 (buffer){out, m});
}

static void set_number(void *envoy, const response *r, buffer key, double v) {
  envoy_dynamic_module_callback_http_set_dynamic_metadata_number(envoy, r->ns, key, v);
}

/* The usage counts and the finish reason in the body's tail, where every API puts them: the
 * last believable count of each side, else what an SSE stream's first event said; the cache hits
 * of the last count of them (none when that one is not believable), else the first event's. */
static void usage(void *envoy, const response *r, const format *f) {
  const char *t = r->tail;
  size_t n = r->tail_len, at, at2;
  double v, v2;
  if (last_number(t, n, f->prompt, true, &v, &at))
    set_number(envoy, r, LIT("prompt_tokens"), v);
  else if (r->prompt >= 0)
    set_number(envoy, r, LIT("prompt_tokens"), r->prompt);
  if (last_number(t, n, f->completion, true, &v, &at))
    set_number(envoy, r, LIT("completion_tokens"), v);
  bool got = last_number(t, n, &CACHED_TOKENS, false, &v, &at);
  if (last_number(t, n, &CACHED, false, &v2, &at2) && (!got || at2 > at)) {
    v = v2;
    got = true;
  }
  if (got) {
    if (v < MAX_COUNT) set_number(envoy, r, LIT("cached_prompt_tokens"), v);
  } else if (r->cached >= 0) {
    set_number(envoy, r, LIT("cached_prompt_tokens"), r->cached);
  }
  buffer reason;
  if (f->finish && last_reason(t, n, f->finish, &reason))
    set_string(envoy, r, LIT("finish_reason"), reason.ptr, reason.length);
}

/* The body ended: what was found goes into the request's dynamic metadata. */
static void finish(void *envoy, response *r) {
  if (r->done) return;
  r->done = true;
  const format *f = r->fmt;
  if (!r->sse) f = r->fmt = format_of(r->pending, r->pending_len);
  if (f && r->sse) {
    set_string(envoy, r, LIT("text"), r->text, r->text_len);
  } else if (f) {
    r->tools = f->tool && contains(r->pending, r->pending_len, f->tool);
    strings(r, r->pending, r->pending_len, f->json, f->key, first_answer);
    if (!r->answered && f->refusal)
      strings(r, r->pending, r->pending_len, NULL, f->refusal, first_answer);
    if (r->answered) {
      size_t k = r->answer_len < TEXT_BYTES ? r->answer_len : TEXT_BYTES;
      set_string(envoy, r, LIT("text"), r->answer, k);
    } else if (!r->cut) {
      set_string(envoy, r, LIT("text"), "", 0);
    }
  }
  if (f) set_string(envoy, r, LIT("format"), f->name, strlen(f->name));
  if (r->first_us >= 0 && (f || !r->sse)) set_number(envoy, r, LIT("first_token_us"), r->first_us);
  if (r->tools)
    envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(envoy, r->ns, LIT("tool_calls"),
                                                                 true);
  if (f) usage(envoy, r, f);
  free(r->pending);
  r->pending = NULL;
  r->pending_len = r->pending_cap = 0;
}

/* --- the event hooks Envoy calls ---------------------------------------------------------- */

/* The filter's config is the metadata namespace to write (empty: "extproc"); the tests run this
 * filter and inspect.lua on one stream by giving it another. */
typedef struct {
  char ns[64];
  size_t ns_len;
} config;

EXPORT const char *envoy_dynamic_module_on_program_init(void) { return ABI_VERSION; }

EXPORT void *envoy_dynamic_module_on_http_filter_config_new(void *envoy, buffer name,
                                                            buffer settings) {
  (void)envoy;
  if (!equals(name, "extproc_inspect") || settings.length >= sizeof(((config *)0)->ns))
    return NULL;
  config *c = calloc(1, sizeof(config));
  if (c == NULL) return NULL;
  if (settings.length == 0) settings = LIT("extproc");
  memcpy(c->ns, settings.ptr, settings.length);
  c->ns_len = settings.length;
  return c;
}

EXPORT void envoy_dynamic_module_on_http_filter_config_destroy(void *c) { free(c); }

EXPORT void *envoy_dynamic_module_on_http_filter_new(void *settings, void *envoy) {
  (void)envoy;
  const config *c = settings;
  response *r = calloc(1, sizeof(response));
  if (r) {
    r->ns = (buffer){c->ns, c->ns_len};
    r->first_us = r->cached = r->prompt = -1;
  }
  return r;
}

EXPORT int envoy_dynamic_module_on_http_filter_response_headers(void *envoy, void *filter,
                                                                bool end_of_stream) {
  response *r = filter;
  if (r == NULL) return CONTINUE;
  buffer type = {NULL, 0};
  size_t count = 0;
  if (envoy_dynamic_module_callback_http_get_header(envoy, RESPONSE_HEADER, LIT("content-type"),
                                                    &type, 0, &count) &&
      type.ptr != NULL) {
    r->sse = memmem(type.ptr, type.length, "text/event-stream", 17) != NULL;
  }
  if (end_of_stream) finish(envoy, r);
  return CONTINUE;
}

EXPORT int envoy_dynamic_module_on_http_filter_response_body(void *envoy, void *filter,
                                                             bool end_of_stream) {
  response *r = filter;
  if (r == NULL || r->done) return CONTINUE;
  size_t count =
      envoy_dynamic_module_callback_http_get_body_chunks_size(envoy, RECEIVED_RESPONSE_BODY);
  if (count > 0) {
    buffer small[8];
    buffer *slices = count <= 8 ? small : malloc(count * sizeof(buffer));
    if (slices &&
        envoy_dynamic_module_callback_http_get_body_chunks(envoy, RECEIVED_RESPONSE_BODY, slices))
      read_frame(r, slices, count);
    if (slices != small) free(slices);
  }
  if (end_of_stream) finish(envoy, r);
  return CONTINUE;
}

EXPORT int envoy_dynamic_module_on_http_filter_response_trailers(void *envoy, void *filter) {
  if (filter) finish(envoy, filter);
  return CONTINUE;
}

EXPORT void envoy_dynamic_module_on_http_filter_destroy(void *filter) {
  response *r = filter;
  if (r) free(r->pending);
  free(r);
}

/* Hooks this filter has no use for, which Envoy requires a module to have. */
EXPORT int envoy_dynamic_module_on_http_filter_request_headers(void *e, void *f, bool end) {
  (void)e, (void)f, (void)end;
  return CONTINUE;
}
EXPORT int envoy_dynamic_module_on_http_filter_request_body(void *e, void *f, bool end) {
  (void)e, (void)f, (void)end;
  return CONTINUE;
}
EXPORT int envoy_dynamic_module_on_http_filter_request_trailers(void *e, void *f) {
  (void)e, (void)f;
  return CONTINUE;
}
EXPORT void envoy_dynamic_module_on_http_filter_stream_complete(void *e, void *f) {
  (void)e, (void)f;
}
EXPORT void envoy_dynamic_module_on_http_filter_http_callout_done(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_headers(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_data(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_trailers(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_complete(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_reset(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_scheduled(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    void) {}
EXPORT void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    void) {}
