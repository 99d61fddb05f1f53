// Sparse-file primitives Node's fs module lacks: fallocate hole punching /
// range zeroing and lseek(SEEK_DATA/SEEK_HOLE).
//
// Every call is asynchronous (napi_create_async_work): fallocate on a large
// range, or lseek on a fragmented file, can take milliseconds, and the event
// loop also carries every other NBD connection.
//
// JS signature of each export: fn(fd, offset[, length], cb) with
// cb(err, result). Errors are Error objects whose .code is the errno name, so
// the TypeScript side maps them like any Node fs error.

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifdef __linux__
#include <linux/falloc.h>
#endif

#include <node_api.h>

typedef enum { OP_PUNCH_HOLE, OP_ZERO_RANGE, OP_SEEK_DATA, OP_SEEK_HOLE } op_kind;

static const char *const op_names[] = {"punchHole", "zeroRange", "seekData", "seekHole"};
static const char *const op_syscalls[] = {"fallocate", "fallocate", "lseek", "lseek"};

typedef struct {
  op_kind op;
  int fd;
  int64_t offset;
  int64_t length;
  int64_t result;
  int err; /* errno of the failed syscall, 0 on success */
  napi_ref callback;
  napi_async_work work;
} request;

/* Largest integer a JS number holds exactly: offsets beyond it would be
 * silently rounded, so they are refused. */
#define MAX_SAFE_INTEGER 9007199254740991.0

/* Errno names as Node spells them (what toBlockDeviceError expects in .code).
 * EOPNOTSUPP and ENOTSUP are the same number on Linux; the fallocate man page
 * calls it EOPNOTSUPP. */
static const char *errno_name(int e) {
  switch (e) {
#ifdef EOPNOTSUPP
    case EOPNOTSUPP: return "EOPNOTSUPP";
#endif
#if defined(ENOTSUP) && (!defined(EOPNOTSUPP) || ENOTSUP != EOPNOTSUPP)
    case ENOTSUP: return "ENOTSUP";
#endif
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case ENODEV: return "ENODEV";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ETXTBSY: return "ETXTBSY";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case ENOSYS: return "ENOSYS";
    case EOVERFLOW: return "EOVERFLOW";
    case ECANCELED: return "ECANCELED";
#ifdef EDQUOT
    case EDQUOT: return "EDQUOT";
#endif
    default: return "EUNKNOWN";
  }
}

static int do_fallocate(int fd, int mode, int64_t offset, int64_t length) {
#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE)
  int r;
  do {
    r = fallocate(fd, mode, (off_t)offset, (off_t)length);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
#else
  (void)fd; (void)mode; (void)offset; (void)length;
  return EOPNOTSUPP;
#endif
}

static void execute(napi_env env, void *data) {
  request *req = data;
  switch (req->op) {
    case OP_PUNCH_HOLE:
#ifdef FALLOC_FL_PUNCH_HOLE
      req->err = do_fallocate(req->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, req->offset, req->length);
#else
      req->err = EOPNOTSUPP;
#endif
      break;
    case OP_ZERO_RANGE:
#ifdef FALLOC_FL_ZERO_RANGE
      req->err = do_fallocate(req->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, req->offset, req->length);
#else
      req->err = EOPNOTSUPP;
#endif
      break;
    case OP_SEEK_DATA:
    case OP_SEEK_HOLE: {
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
      off_t r = lseek(req->fd, (off_t)req->offset, req->op == OP_SEEK_DATA ? SEEK_DATA : SEEK_HOLE);
      if (r >= 0) {
        req->result = (int64_t)r;
        req->err = 0;
      } else if (errno == ENXIO) {
        /* ENXIO: offset at or past EOF, or (SEEK_DATA) nothing but hole up to
         * EOF. Not an error for callers: there is simply no more data, and
         * the virtual hole at EOF starts at the file size. */
        req->err = 0;
        if (req->op == OP_SEEK_DATA) {
          req->result = -1;
        } else {
          struct stat st;
          if (fstat(req->fd, &st) == 0)
            req->result = (int64_t)st.st_size;
          else
            req->err = errno;
        }
      } else {
        req->err = errno;
      }
#else
      req->err = EOPNOTSUPP;
#endif
      break;
    }
  }
}

static napi_value make_error(napi_env env, const request *req, int e) {
  char msg[256];
  const char *name = errno_name(e);
  snprintf(msg, sizeof msg, "%s: %s, %s", name, strerror(e), op_syscalls[req->op]);
  napi_value code, message, error, value;
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, code, message, &error);
  /* Mirror Node's fs errors (negative errno, syscall name) for logs. */
  napi_create_int32(env, -e, &value);
  napi_set_named_property(env, error, "errno", value);
  napi_create_string_utf8(env, op_syscalls[req->op], NAPI_AUTO_LENGTH, &value);
  napi_set_named_property(env, error, "syscall", value);
  return error;
}

static void complete(napi_env env, napi_status status, void *data) {
  request *req = data;
  napi_value cb, global, argv[2];
  int e = status == napi_cancelled ? ECANCELED : req->err;

  if (e != 0) {
    argv[0] = make_error(env, req, e);
    napi_get_undefined(env, &argv[1]);
  } else {
    napi_get_null(env, &argv[0]);
    napi_create_int64(env, req->result, &argv[1]);
  }
  napi_get_reference_value(env, req->callback, &cb);
  napi_get_global(env, &global);
  /* A throw from the callback stays pending; Node reports it as uncaught
   * once we return, as for any other native callback. */
  napi_call_function(env, global, cb, 2, argv, NULL);

  napi_delete_reference(env, req->callback);
  napi_delete_async_work(env, req->work);
  free(req);
}

static int get_offset(napi_env env, napi_value v, const char *what, int64_t *out) {
  napi_valuetype t;
  double d;
  napi_typeof(env, v, &t);
  if (t != napi_number) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", what);
    return 0;
  }
  napi_get_value_double(env, v, &d);
  if (!(d >= 0 && d <= MAX_SAFE_INTEGER) || d != floor(d)) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", what);
    return 0;
  }
  *out = (int64_t)d;
  return 1;
}

/* Shared argument parsing: (fd, offset, [length,] callback). */
static napi_value start(napi_env env, napi_callback_info info, op_kind op, size_t nargs) {
  napi_value argv[4], resource;
  size_t argc = 4;
  napi_valuetype t;
  int32_t fd;
  int64_t offset = 0, length = 0;
  request *req;

  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < nargs) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", nargs == 4 ? "expected (fd, offset, length, callback)" : "expected (fd, offset, callback)");
    return NULL;
  }
  napi_typeof(env, argv[0], &t);
  if (t != napi_number || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "fd must be a non-negative integer");
    return NULL;
  }
  if (!get_offset(env, argv[1], "offset must be an integer in [0, 2^53)", &offset)) return NULL;
  if (nargs == 4) {
    if (!get_offset(env, argv[2], "length must be an integer in [0, 2^53)", &length)) return NULL;
    if ((double)offset + (double)length > MAX_SAFE_INTEGER) {
      napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "offset + length must not exceed 2^53");
      return NULL;
    }
  }
  napi_typeof(env, argv[nargs - 1], &t);
  if (t != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "callback must be a function");
    return NULL;
  }

  req = calloc(1, sizeof *req);
  if (!req) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  req->op = op;
  req->fd = fd;
  req->offset = offset;
  req->length = length;
  napi_create_reference(env, argv[nargs - 1], 1, &req->callback);
  napi_create_string_utf8(env, op_names[op], NAPI_AUTO_LENGTH, &resource);
  if (napi_create_async_work(env, NULL, resource, execute, complete, req, &req->work) != napi_ok ||
      napi_queue_async_work(env, req->work) != napi_ok) {
    napi_delete_reference(env, req->callback);
    if (req->work) napi_delete_async_work(env, req->work);
    free(req);
    napi_throw_error(env, NULL, "could not queue async work");
    return NULL;
  }
  return NULL;
}

static napi_value punch_hole(napi_env env, napi_callback_info info) { return start(env, info, OP_PUNCH_HOLE, 4); }
static napi_value zero_range(napi_env env, napi_callback_info info) { return start(env, info, OP_ZERO_RANGE, 4); }
static napi_value seek_data(napi_env env, napi_callback_info info) { return start(env, info, OP_SEEK_DATA, 3); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return start(env, info, OP_SEEK_HOLE, 3); }

// Synchronous I/O that never waits for a disk: preadv2/pwritev2 with
// RWF_NOWAIT succeed only when the page cache can serve them at once, and
// fail with EAGAIN otherwise (then the caller goes to the thread pool). A
// page-cache hit done on the event loop costs a syscall; the same hit sent
// through libuv's pool costs two thread hand-offs.
//
// JS: preadNoWait(fd, buffer, position) / pwriteNoWait(fd, buffer, position)
// -> bytes transferred, or -1 when the call would block or is not supported.
static napi_value nowait_io(napi_env env, napi_callback_info info, int write) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  void *data;
  size_t len;
  int64_t pos;
  napi_value out;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_buffer_info(env, argv[1], &data, &len) != napi_ok ||
      napi_get_value_int64(env, argv[2], &pos) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd, buffer, position)");
    return NULL;
  }
  ssize_t n = -1;
#if defined(__linux__) && defined(RWF_NOWAIT)
  struct iovec iov = {data, len};
  do {
    n = write ? pwritev2(fd, &iov, 1, pos, RWF_NOWAIT) : preadv2(fd, &iov, 1, pos, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) n = -1; /* EAGAIN, EOPNOTSUPP, anything: let the caller take the slow path, which reports real errors */
#endif
  napi_create_int64(env, (int64_t)n, &out);
  return out;
}

static napi_value pread_nowait(napi_env env, napi_callback_info info) { return nowait_io(env, info, 0); }
static napi_value pwrite_nowait(napi_env env, napi_callback_info info) { return nowait_io(env, info, 1); }

// A buffered write done on the event loop, which says whether the thread slept in it. Copying
// into cached pages never sleeps; writeback throttling (balance_dirty_pages), waiting for a page
// or for block allocation does, and the caller then sends its next writes to the pool. Being
// preempted by another process is an involuntary switch and does not count: on a loaded machine
// a wall-clock threshold mistook that for a slow disk.
//
// JS: pwritevSync(fd, buffers, position) -> bytes written, or -(bytes written) - 1 when the
// thread made a voluntary context switch during the call. Throws an Error whose .code is the
// errno name when pwritev fails.
#define PWRITEV_MAX_PIECES 64
static napi_value pwritev_sync(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], out;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  int64_t pos;
  bool is_array = false;
  uint32_t count = 0;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, argv[1], &count) != napi_ok || count < 1 || count > PWRITEV_MAX_PIECES ||
      napi_get_value_int64(env, argv[2], &pos) != napi_ok || pos < 0) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected (fd, buffers (1 to 64 Buffers), position >= 0)");
    return NULL;
  }
  struct iovec iov[PWRITEV_MAX_PIECES];
  for (uint32_t i = 0; i < count; i++) {
    napi_value piece;
    bool is_buffer = false;
    if (napi_get_element(env, argv[1], i, &piece) != napi_ok || napi_is_buffer(env, piece, &is_buffer) != napi_ok ||
        !is_buffer || napi_get_buffer_info(env, piece, &iov[i].iov_base, &iov[i].iov_len) != napi_ok) {
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected (fd, buffers (1 to 64 Buffers), position >= 0)");
      return NULL;
    }
  }
  struct rusage before, after;
  getrusage(RUSAGE_THREAD, &before);
  ssize_t n;
  do {
    n = pwritev(fd, iov, (int)count, pos);
  } while (n < 0 && errno == EINTR);
  int e = errno;
  getrusage(RUSAGE_THREAD, &after);
  if (n < 0) {
    napi_value code, message, error, value;
    char msg[160];
    snprintf(msg, sizeof msg, "%s: %s, pwritev", errno_name(e), strerror(e));
    napi_create_string_utf8(env, errno_name(e), NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, code, message, &error);
    napi_create_int32(env, -e, &value);
    napi_set_named_property(env, error, "errno", value);
    napi_create_string_utf8(env, "pwritev", NAPI_AUTO_LENGTH, &value);
    napi_set_named_property(env, error, "syscall", value);
    napi_throw(env, error);
    return NULL;
  }
  int slept = after.ru_nvcsw != before.ru_nvcsw;
  napi_create_int64(env, slept ? -(int64_t)n - 1 : (int64_t)n, &out);
  return out;
}

// pidfdGetfd(pid, fd): a duplicate of another process's fd (pidfd_open +
// pidfd_getfd, Linux 5.6+), or -errno. Socket activation through a wrapper
// (`npx blockmirror`, which spawns us without passing fd 3 on) uses it to
// take the listening sockets from the ancestor that LISTEN_PID names.
static napi_value pidfd_getfd_js(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t pid, fd;
  napi_value out;
  if (argc < 2 || napi_get_value_int32(env, argv[0], &pid) != napi_ok || napi_get_value_int32(env, argv[1], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (pid, fd)");
    return NULL;
  }
  long r = -ENOSYS;
#if defined(__linux__) && defined(SYS_pidfd_open) && defined(SYS_pidfd_getfd)
  long pidfd = syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    r = -errno;
  } else {
    r = syscall(SYS_pidfd_getfd, (int)pidfd, fd, 0);
    if (r < 0) r = -errno;
    close((int)pidfd);
  }
#endif
  napi_create_int64(env, (int64_t)r, &out);
  return out;
}

// alignGap(buffer, align): bytes from the buffer's start to the first address
// that is a multiple of align (a power of two). O_DIRECT needs aligned memory
// and Node has no aligned allocation: callers allocate align more bytes and
// use the subarray from the gap (src/xfer/pool.ts).
static napi_value align_gap(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *data;
  size_t len;
  int64_t align;
  napi_value out;
  if (argc < 2 || napi_get_buffer_info(env, argv[0], &data, &len) != napi_ok || napi_get_value_int64(env, argv[1], &align) != napi_ok ||
      align <= 0 || (align & (align - 1)) != 0) {
    napi_throw_type_error(env, NULL, "expected (buffer, align), align a power of two");
    return NULL;
  }
  uintptr_t a = (uintptr_t)align;
  napi_create_int64(env, (int64_t)((a - ((uintptr_t)data & (a - 1))) & (a - 1)), &out);
  return out;
}

// adviseHuge(buffer): madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of a buffer whose pages
// were never touched (Buffer.allocUnsafeSlow of a few MiB is a fresh mapping). With transparent
// huge pages in "madvise" mode (Debian's default) its first touch then faults in 2 MiB pages,
// not 4 KiB ones: one fault instead of 512, and fewer TLB misses in every copy of it. Returns the
// bytes advised (0 when the buffer holds no whole 2 MiB page, or where THP is off: nothing to do),
// or -errno.
static napi_value advise_huge(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *data;
  size_t len;
  napi_value out;
  if (argc < 1 || napi_get_buffer_info(env, argv[0], &data, &len) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (buffer)");
    return NULL;
  }
  int64_t r = 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  uintptr_t start = ((uintptr_t)data + huge - 1) & ~(huge - 1);
  uintptr_t end = ((uintptr_t)data + len) & ~(huge - 1);
  if (end > start) r = madvise((void *)start, end - start, MADV_HUGEPAGE) == 0 ? (int64_t)(end - start) : -errno;
  if (r == -EINVAL) r = 0;  // a kernel without THP
#endif
  napi_create_int64(env, r, &out);
  return out;
}

// Reads a JS string argument into a malloc'd C string (NULL if it is not a string or has a NUL).
static char *dup_string(napi_env env, napi_value v) {
  size_t len;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return NULL;
  char *s = malloc(len + 1);
  if (s == NULL) return NULL;
  if (napi_get_value_string_utf8(env, v, s, len + 1, &len) != napi_ok || strlen(s) != len) {
    free(s);
    return NULL;
  }
  return s;
}

// Clears FD_CLOEXEC on fd, if it is open and has it.
static void keep_open(int fd) {
  int flags = fcntl(fd, F_GETFD);
  if (flags >= 0 && (flags & FD_CLOEXEC)) fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
}

// execSelf(path, argv, keepFds): execv(path, argv). The process keeps its pid and environment and
// runs the new image from its start; a server command uses it to restart itself with the V8 flags
// it needs (bin/server-flags.js). Node marks fds 0-2 close-on-exec when it starts, so they, and
// the fds of keepFds (socket activation's), are cleared of FD_CLOEXEC first: else the new image
// would start with /dev/null for stdio. Returns only on failure, with -errno.
static napi_value exec_self(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  bool is_array = false, keep_is_array = false;
  uint32_t n = 0, keep = 0;
  if (argc < 3 || napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[1], &n) != napi_ok || n < 1 || n > 4096 ||
      napi_is_array(env, argv[2], &keep_is_array) != napi_ok || !keep_is_array || napi_get_array_length(env, argv[2], &keep) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (path, argv, keepFds), argv a non-empty array of strings, keepFds an array of fds");
    return NULL;
  }
  char *path = dup_string(env, argv[0]);
  char **args = calloc((size_t)n + 1, sizeof(char *));
  int64_t r = -EINVAL;
  if (path != NULL && args != NULL) {
    uint32_t i = 0;
    for (; i < n; i++) {
      napi_value el;
      if (napi_get_element(env, argv[1], i, &el) != napi_ok || (args[i] = dup_string(env, el)) == NULL) break;
    }
    if (i == n) {
      for (int fd = 0; fd <= 2; fd++) keep_open(fd);
      for (uint32_t k = 0; k < keep; k++) {
        napi_value el;
        int32_t fd;
        if (napi_get_element(env, argv[2], k, &el) == napi_ok && napi_get_value_int32(env, el, &fd) == napi_ok && fd >= 0) keep_open(fd);
      }
      execv(path, args);
      r = -errno;
    }
  }
  if (args != NULL) {
    for (uint32_t i = 0; i < n; i++) free(args[i]);
    free(args);
  }
  free(path);
  napi_value out;
  napi_create_int64(env, r, &out);
  return out;
}

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"preadNoWait", NULL, pread_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pwriteNoWait", NULL, pwrite_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pwritevSync", NULL, pwritev_sync, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pidfdGetfd", NULL, pidfd_getfd_js, NULL, NULL, NULL, napi_enumerable, NULL},
      {"alignGap", NULL, align_gap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"adviseHuge", NULL, advise_huge, NULL, NULL, NULL, napi_enumerable, NULL},
      {"execSelf", NULL, exec_self, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}
