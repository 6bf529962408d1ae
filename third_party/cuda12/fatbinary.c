// A `fatbinary` for clang's CUDA driver, built on NVIDIA's libnvfatbin.
//
// No CUDA 12 redistributable wheel ships the `fatbinary` tool that bundles the
// per-architecture cubins and the PTX into one CUDA fat binary; libnvfatbin
// (nvidia-nvfatbin-cu12) creates the same container. clang runs
//
//   fatbinary -64 --create OUT [-g] --image=profile=sm_90,file=K.cubin
//                                   --image=profile=compute_90,file=K.s ...
//
// (clang/lib/Driver/ToolChains/Cuda.cpp, FatBinary::ConstructJob), plus any
// -Xcuda-fatbinary arguments. This accepts exactly that syntax, and
// --compress-mode=M / --compress=BOOL / --compress-all, which go to libnvfatbin
// unchanged. Anything else is an error (exit 2), never silently ignored.
// Exit 1: a file or libnvfatbin failed; the message names which. The fat
// binary is written to OUT.tmp and renamed to OUT; on any failure OUT does not
// exist afterwards (not even one left by an earlier run).
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "nvFatbin.h"

#define MAX_IMAGES 256
#define MAX_OPTIONS 16

typedef struct {
  int is_ptx;        // profile=compute_NN (PTX) or sm_NN (cubin)
  char arch[16];     // "NN" or "NNa"
  const char* file;
} Image;

static int usage(const char* why, const char* arg) {
  fprintf(stderr, "fatbinary: %s%s%s\n", why, arg ? ": " : "", arg ? arg : "");
  fprintf(stderr,
          "usage: fatbinary -64|-32 --create OUT [-g] [--compress-mode=M] [--compress=BOOL]\n"
          "                 [--compress-all]\n"
          "                 --image=profile={sm_NN|compute_NN},file=PATH ...\n");
  return 2;
}

// "profile=sm_90,file=/x/y.cubin" -> Image. Returns 0 on success.
static int parse_image(const char* spec, Image* out) {
  const char* p = spec;
  if (strncmp(p, "profile=", 8) != 0) return -1;
  p += 8;
  const char* comma = strchr(p, ',');
  if (!comma || strncmp(comma + 1, "file=", 5) != 0 || comma[6] == '\0') return -1;
  size_t prefix;
  if (strncmp(p, "sm_", 3) == 0) {
    out->is_ptx = 0;
    prefix = 3;
  } else if (strncmp(p, "compute_", 8) == 0) {
    out->is_ptx = 1;
    prefix = 8;
  } else {
    return -1;
  }
  size_t n = (size_t)(comma - p) - prefix;
  if (n == 0 || n >= sizeof(out->arch)) return -1;
  memcpy(out->arch, p + prefix, n);
  out->arch[n] = '\0';
  for (size_t i = 0; i < n; ++i) {
    char c = out->arch[i];
    int digit = c >= '0' && c <= '9';
    if (!(digit || (i > 0 && i == n - 1 && (c == 'a' || c == 'f')))) return -1;
  }
  out->file = comma + 6;
  return 0;
}

// The whole file, plus a terminating NUL (PTX is passed as a C string). With
// newline_first, a '\n' is put in front unless the file starts with one:
// libnvfatbin (12.9) drops the first line of a PTX that does not start with a
// newline, which loses ".version" when that is the first line (clang's PTX
// starts with a comment, so it only loses that).
static char* read_file(const char* path, size_t* size, int newline_first) {
  FILE* f = fopen(path, "rb");
  if (!f) return NULL;
  char* buf = NULL;
  size_t cap = 0, len = 0;
  for (;;) {
    if (cap - len < 65536 + 1) {
      cap = cap ? cap * 2 : 1 << 20;
      char* grown = (char*)realloc(buf, cap);
      if (!grown) {
        free(buf);
        fclose(f);
        errno = ENOMEM;
        return NULL;
      }
      buf = grown;
    }
    size_t got = fread(buf + len, 1, cap - len - 1, f);
    len += got;
    if (got == 0) break;
  }
  int failed = ferror(f) ? (errno ? errno : EIO) : 0;
  fclose(f);
  if (failed) {
    free(buf);
    errno = failed;
    return NULL;
  }
  buf[len] = '\0';
  if (newline_first && len > 0 && buf[0] != '\n') {
    memmove(buf + 1, buf, len + 1);  // room: the loop keeps 65536 bytes spare
    buf[0] = '\n';
    ++len;
  }
  *size = len;
  return buf;
}

// Exit 1 without leaving OUT (or OUT.tmp) behind.
static const char* g_out_path;
static char g_tmp_path[4096];

static int fail(void) {
  if (g_tmp_path[0]) unlink(g_tmp_path);
  if (g_out_path) unlink(g_out_path);
  return 1;
}

// The sm_NN of the PTX's ".target sm_NN[, ...]" line into `target`; 0 when found.
// libnvfatbin files PTX under whatever arch it is told, so a compute_90 image
// whose text targets sm_80 would pass unnoticed.
static int ptx_target(const char* ptx, char* target, size_t cap) {
  for (const char* line = ptx; line && *line; line = strchr(line, '\n'), line = line ? line + 1 : NULL) {
    const char* p = line;
    while (*p == ' ' || *p == '\t') ++p;
    if (strncmp(p, ".target", 7) != 0 || (p[7] != ' ' && p[7] != '\t')) continue;
    p += 7;
    while (*p == ' ' || *p == '\t') ++p;
    size_t n = strcspn(p, ", \t\r\n");
    if (n == 0 || n >= cap) return -1;
    memcpy(target, p, n);
    target[n] = '\0';
    return 0;
  }
  return -1;
}

#define CHECK(call, what)                                                        \
  do {                                                                           \
    nvFatbinResult r_ = (call);                                                  \
    if (r_ != NVFATBIN_SUCCESS) {                                                \
      fprintf(stderr, "fatbinary: %s: %s\n", what, nvFatbinGetErrorString(r_));  \
      return fail();                                                             \
    }                                                                            \
  } while (0)

int main(int argc, char** argv) {
  const char* options[MAX_OPTIONS];
  size_t n_options = 0;
  Image images[MAX_IMAGES];
  size_t n_images = 0;
  const char* out_path = NULL;
  int bits = 0;

  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    if (strcmp(a, "-64") == 0 || strcmp(a, "-32") == 0) {
      bits = a[1] == '6' ? 64 : 32;
    } else if (strcmp(a, "--create") == 0) {
      if (++i == argc) return usage("--create needs a file name", NULL);
      out_path = argv[i];
    } else if (strncmp(a, "--create=", 9) == 0) {
      out_path = a + 9;
    } else if (strcmp(a, "-g") == 0) {
      if (n_options == MAX_OPTIONS) return usage("too many options", a);
      options[n_options++] = "-g";
    } else if (strncmp(a, "--compress-mode=", 16) == 0 || strncmp(a, "--compress=", 11) == 0 ||
               strcmp(a, "--compress-all") == 0) {
      if (n_options == MAX_OPTIONS) return usage("too many options", a);
      options[n_options++] = a + 1;  // libnvfatbin spells them with one dash
    } else if (strncmp(a, "--image=", 8) == 0) {
      if (n_images == MAX_IMAGES) return usage("too many images", a);
      if (parse_image(a + 8, &images[n_images]) != 0)
        return usage("expected --image=profile={sm_NN|compute_NN},file=PATH", a);
      ++n_images;
    } else {
      return usage("unsupported argument", a);
    }
  }
  if (!out_path || !*out_path) return usage("no --create OUT", NULL);
  if (!bits) return usage("no -64 or -32", NULL);
  if (n_images == 0) return usage("no --image", NULL);
  if (n_options + 2 > MAX_OPTIONS) return usage("too many options", NULL);
  options[n_options++] = bits == 64 ? "-64" : "-32";
  options[n_options++] = "-host=linux";
  if (snprintf(g_tmp_path, sizeof g_tmp_path, "%s.tmp", out_path) >= (int)sizeof g_tmp_path)
    return usage("output file name too long", out_path);
  g_out_path = out_path;

  char create[1024] = "creating the fat binary with options";
  for (size_t i = 0; i < n_options; ++i) {
    size_t len = strlen(create);
    snprintf(create + len, sizeof create - len, " %s", options[i]);
  }
  nvFatbinHandle handle = NULL;
  CHECK(nvFatbinCreate(&handle, options, n_options), create);
  for (size_t i = 0; i < n_images; ++i) {
    size_t size = 0;
    char* code = read_file(images[i].file, &size, images[i].is_ptx);
    if (!code) {
      fprintf(stderr, "fatbinary: cannot read %s: %s\n", images[i].file, strerror(errno));
      return fail();
    }
    // The identifier is what cuobjdump shows as the entry's name.
    const char* slash = strrchr(images[i].file, '/');
    const char* ident = slash ? slash + 1 : images[i].file;
    char what[512];
    snprintf(what, sizeof what, "adding %s (%s_%s)", images[i].file,
             images[i].is_ptx ? "compute" : "sm", images[i].arch);
    if (size == 0) {
      fprintf(stderr, "fatbinary: %s: empty file\n", what);
      free(code);
      return fail();
    }
    if (images[i].is_ptx) {
      char target[32], want[32];
      snprintf(want, sizeof want, "sm_%s", images[i].arch);
      if (ptx_target(code, target, sizeof target) != 0) {
        fprintf(stderr, "fatbinary: %s: no .target line in the PTX\n", what);
        free(code);
        return fail();
      }
      if (strcmp(target, want) != 0) {
        fprintf(stderr, "fatbinary: %s: the PTX's .target is %s, not %s\n", what, target, want);
        free(code);
        return fail();
      }
      CHECK(nvFatbinAddPTX(handle, code, size + 1, images[i].arch, ident, ""), what);
    } else {
      CHECK(nvFatbinAddCubin(handle, code, size, images[i].arch, ident), what);
    }
    free(code);
  }
  size_t size = 0;
  CHECK(nvFatbinSize(handle, &size), "sizing the fat binary");
  char* fatbin = (char*)malloc(size ? size : 1);
  if (!fatbin) {
    fprintf(stderr, "fatbinary: out of memory (%zu bytes)\n", size);
    return fail();
  }
  CHECK(nvFatbinGet(handle, fatbin), "writing the fat binary");
  CHECK(nvFatbinDestroy(&handle), "releasing the fat binary");

  FILE* f = fopen(g_tmp_path, "wb");
  int ok = f != NULL;
  if (ok) ok = fwrite(fatbin, 1, size, f) == size;
  if (f && fclose(f) != 0) ok = 0;
  if (!ok) {
    fprintf(stderr, "fatbinary: cannot write %s: %s\n", g_tmp_path, strerror(errno));
    return fail();
  }
  if (rename(g_tmp_path, out_path) != 0) {
    fprintf(stderr, "fatbinary: cannot rename %s to %s: %s\n", g_tmp_path, out_path,
            strerror(errno));
    return fail();
  }
  free(fatbin);
  return 0;
}
