// Thin node-addon-api wrapper over the core and the vCPU threads. Returns raw results: a number
// (negative errno on failure) or a buffer; the TypeScript layer names calls,
// decodes structures and raises errors.
#include <napi.h>

#include <string>

#include "core.h"
#include "vcpu_thread.h"

namespace {

// Data pointer and length of an ArrayBuffer, TypedArray or DataView.
bool bytes(const Napi::Value &v, uint8_t **data, size_t *len) {
  napi_env env = v.Env();
  if (v.IsArrayBuffer()) {
    auto ab = v.As<Napi::ArrayBuffer>();
    *data = static_cast<uint8_t *>(ab.Data());
    *len = ab.ByteLength();
    return true;
  }
  if (v.IsTypedArray()) {
    napi_typedarray_type t;
    size_t n;
    void *d;
    napi_value ab;
    size_t off;
    if (napi_get_typedarray_info(env, v, &t, &n, &d, &ab, &off) != napi_ok) return false;
    *data = static_cast<uint8_t *>(d);
    *len = v.As<Napi::TypedArray>().ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    auto dv = v.As<Napi::DataView>();
    *data = static_cast<uint8_t *>(dv.Data());
    *len = dv.ByteLength();
    return true;
  }
  return false;
}

Napi::Value fail(const Napi::Env &env, const char *msg) {
  Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

int64_t i64(const Napi::Value &v) {
  if (v.IsBigInt()) {
    bool lossless;
    return v.As<Napi::BigInt>().Int64Value(&lossless);
  }
  if (v.IsNumber()) return v.As<Napi::Number>().Int64Value();
  return 0;
}

uint64_t u64(const Napi::Value &v) {
  if (v.IsBigInt()) {
    bool lossless;
    return v.As<Napi::BigInt>().Uint64Value(&lossless);
  }
  if (v.IsNumber()) return (uint64_t)v.As<Napi::Number>().Int64Value();
  return 0;
}

Napi::Value num(const Napi::Env &env, int64_t r) { return Napi::Number::New(env, (double)r); }

#define ARGS(n)                                               \
  Napi::Env env = info.Env();                                 \
  if (info.Length() < (n)) return fail(env, "too few arguments")

Napi::Value Open(const Napi::CallbackInfo &info) {
  ARGS(2);
  std::string path = info[0].As<Napi::String>().Utf8Value();
  return num(env, kh::open_dev(path.c_str(), (int)i64(info[1])));
}

Napi::Value Close(const Napi::CallbackInfo &info) {
  ARGS(1);
  return num(env, kh::close_fd((int)i64(info[0])));
}

Napi::Value Ioctl(const Napi::CallbackInfo &info) {
  ARGS(2);
  uint64_t arg = info.Length() > 2 ? u64(info[2]) : 0;
  return num(env, kh::ioctl_int((int)i64(info[0]), (unsigned long)u64(info[1]), arg));
}

Napi::Value IoctlBuf(const Napi::CallbackInfo &info) {
  ARGS(3);
  uint8_t *d;
  size_t n;
  if (!bytes(info[2], &d, &n)) return fail(env, "ioctlBuf: third argument must be a buffer");
  return num(env, kh::ioctl_ptr((int)i64(info[0]), (unsigned long)u64(info[1]), d));
}

// mmap(len, prot, flags, fd, offset) -> external ArrayBuffer, or -errno.
Napi::Value Mmap(const Napi::CallbackInfo &info) {
  ARGS(5);
  size_t len = (size_t)i64(info[0]);
  int64_t r = kh::map(len, (int)i64(info[1]), (int)i64(info[2]), (int)i64(info[3]), i64(info[4]));
  if (r < 0) return num(env, r);
  return Napi::ArrayBuffer::New(env, reinterpret_cast<void *>(r), len);
}

// munmap(arrayBuffer): detaches the buffer first so that no view can touch
// the unmapped range afterwards.
Napi::Value Munmap(const Napi::CallbackInfo &info) {
  ARGS(1);
  if (!info[0].IsArrayBuffer()) return fail(env, "munmap: argument must be an ArrayBuffer from mmap");
  auto ab = info[0].As<Napi::ArrayBuffer>();
  void *addr = ab.Data();
  size_t len = ab.ByteLength();
  if (addr == nullptr) return num(env, 0);  // already detached
  ab.Detach();
  return num(env, kh::unmap(addr, len));
}

Napi::Value AddressOf(const Napi::CallbackInfo &info) {
  ARGS(1);
  uint8_t *d;
  size_t n;
  if (!bytes(info[0], &d, &n)) return fail(env, "addressOf: argument must be a buffer");
  return Napi::BigInt::New(env, (uint64_t)(uintptr_t)d);
}

// Range calls: (buffer, offset, len, ...), the range inside the buffer.
bool range(const Napi::CallbackInfo &info, uint8_t **p, size_t *len) {
  uint8_t *d;
  size_t n;
  if (!bytes(info[0], &d, &n)) return false;
  size_t off = (size_t)i64(info[1]);
  size_t l = (size_t)i64(info[2]);
  if (off > n || l > n - off) return false;
  *p = d + off;
  *len = l;
  return true;
}

// A range call with `nargs` arguments: call(p, len) on the range, or an
// exception naming the call when the range is outside the buffer.
template <typename Call>
Napi::Value on_range(const Napi::CallbackInfo &info, const char *name, size_t nargs, Call call) {
  ARGS(nargs);
  uint8_t *p;
  size_t l;
  if (!range(info, &p, &l)) return fail(env, (std::string(name) + ": range outside the buffer").c_str());
  return num(env, call(p, l));
}

Napi::Value Madvise(const Napi::CallbackInfo &info) {
  return on_range(info, "madvise", 4, [&](uint8_t *p, size_t l) { return kh::advise(p, l, (int)i64(info[3])); });
}

Napi::Value Mprotect(const Napi::CallbackInfo &info) {
  return on_range(info, "mprotect", 4, [&](uint8_t *p, size_t l) { return kh::protect(p, l, (int)i64(info[3])); });
}

// unmapRange(buffer, offset, len): munmap of part of a mapped buffer. The
// buffer stays attached; the caller must not touch the range until remapRange.
Napi::Value UnmapRange(const Napi::CallbackInfo &info) {
  return on_range(info, "unmapRange", 3, [](uint8_t *p, size_t l) { return kh::unmap(p, l); });
}

// remapRange(buffer, offset, len, prot, flags, fd, fileOffset): mmap with
// MAP_FIXED over part of a mapped buffer.
Napi::Value RemapRange(const Napi::CallbackInfo &info) {
  return on_range(info, "remapRange", 7, [&](uint8_t *p, size_t l) {
    return kh::map_fixed(p, l, (int)i64(info[3]), (int)i64(info[4]), (int)i64(info[5]), i64(info[6]));
  });
}

Napi::Value MemfdCreate(const Napi::CallbackInfo &info) {
  ARGS(2);
  std::string name = info[0].As<Napi::String>().Utf8Value();
  return num(env, kh::memfd(name.c_str(), (unsigned)i64(info[1])));
}

Napi::Value Fallocate(const Napi::CallbackInfo &info) {
  ARGS(4);
  return num(env, kh::falloc((int)i64(info[0]), (int)i64(info[1]), i64(info[2]), i64(info[3])));
}

Napi::Value Ftruncate(const Napi::CallbackInfo &info) {
  ARGS(2);
  return num(env, kh::truncate_fd((int)i64(info[0]), i64(info[1])));
}

Napi::Value Pread(const Napi::CallbackInfo &info) {
  ARGS(3);
  uint8_t *d;
  size_t n;
  if (!bytes(info[1], &d, &n)) return fail(env, "pread: second argument must be a buffer");
  return num(env, kh::pread_fd((int)i64(info[0]), d, n, i64(info[2])));
}

Napi::Value Write(const Napi::CallbackInfo &info) {
  ARGS(2);
  uint8_t *d;
  size_t n;
  if (!bytes(info[1], &d, &n)) return fail(env, "write: second argument must be a buffer");
  return num(env, kh::write_fd((int)i64(info[0]), d, n));
}

Napi::Value Gettid(const Napi::CallbackInfo &info) { return num(info.Env(), kh::gettid_()); }
Napi::Value KickInstall(const Napi::CallbackInfo &info) { return num(info.Env(), kh::kick_install()); }
Napi::Value KickSignal(const Napi::CallbackInfo &info) { return num(info.Env(), kh::kick_signal()); }
Napi::Value Kick(const Napi::CallbackInfo &info) {
  ARGS(1);
  return num(env, kh::kick(i64(info[0])));
}

// A vCPU thread's owner: the thread itself, and the JS callback it notifies
// (through a thread-safe function) when a run ends while the owner waits.
struct ThreadHandle {
  kh::VcpuThread *thread = nullptr;
  napi_threadsafe_function tsfn = nullptr;
  Napi::Reference<Napi::Value> ctl, console;
  bool ref = false;
};

void CallDone(napi_env env, napi_value cb, void *, void *data) {
  if (env == nullptr || cb == nullptr) return;
  napi_value seq;
  napi_create_int32(env, (int32_t)(intptr_t)data, &seq);
  napi_value undefined;
  napi_get_undefined(env, &undefined);
  napi_call_function(env, undefined, cb, 1, &seq, nullptr);
}

void Notify(void *arg, int32_t seq) {
  napi_call_threadsafe_function(static_cast<ThreadHandle *>(arg)->tsfn, (void *)(intptr_t)seq, napi_tsfn_nonblocking);
}

// threadStart(ctl: Int32Array over a SharedArrayBuffer, console: Uint8Array,
// onDone(seq)) -> handle (an External), or -errno. The thread's tid is in
// ctl[CTL_TID] when it returns.
Napi::Value ThreadStart(const Napi::CallbackInfo &info) {
  ARGS(3);
  uint8_t *ctl, *out;
  size_t clen, cap;
  if (!bytes(info[0], &ctl, &clen) || clen < kh::CTL_WORDS * 4 || !bytes(info[1], &out, &cap) || !info[2].IsFunction())
    return fail(env, "threadStart: bad arguments");
  auto *h = new ThreadHandle();
  napi_value name = Napi::String::New(env, "kvmharness vCPU thread");
  if (napi_create_threadsafe_function(env, info[2], nullptr, name, 0, 1, nullptr, nullptr, nullptr, CallDone,
                                      &h->tsfn) != napi_ok) {
    delete h;
    return fail(env, "threadStart: napi_create_threadsafe_function failed");
  }
  napi_unref_threadsafe_function(env, h->tsfn);
  h->ctl = Napi::Persistent(info[0]);
  h->console = Napi::Persistent(info[1]);
  int64_t err = 0;
  h->thread = kh::thread_start(reinterpret_cast<int32_t *>(ctl), out, cap, Notify, h, &err);
  if (!h->thread) {
    napi_release_threadsafe_function(h->tsfn, napi_tsfn_abort);
    delete h;
    return num(env, err);
  }
  // A handle whose thread was joined is freed with its External; one whose
  // thread never ended (abandoned in KVM_RUN) is kept, with its buffers.
  return Napi::External<ThreadHandle>::New(env, h, [](Napi::Env, ThreadHandle *t) {
    if (!t->thread) delete t;
  });
}

ThreadHandle *handle(const Napi::Value &v) {
  return v.IsExternal() ? v.As<Napi::External<ThreadHandle>>().Data() : nullptr;
}

// threadPost(handle, onCallerCpu): wakes the thread after a new command word,
// first pinning it to the caller's CPU when onCallerCpu is true.
Napi::Value ThreadPost(const Napi::CallbackInfo &info) {
  ARGS(2);
  ThreadHandle *h = handle(info[0]);
  if (!h || !h->thread) return fail(env, "threadPost: not a live vCPU thread");
  kh::thread_post(h->thread, info[1].ToBoolean());
  return env.Undefined();
}

// threadWait(handle, seq, waitUs) -> whether the thread finished command `seq`
// within waitUs. The caller's thread sleeps meanwhile; a signal ends the wait.
Napi::Value ThreadWait(const Napi::CallbackInfo &info) {
  ARGS(3);
  ThreadHandle *h = handle(info[0]);
  if (!h || !h->thread) return fail(env, "threadWait: not a live vCPU thread");
  bool done = kh::thread_wait(h->thread, (int32_t)i64(info[1]), (uint64_t)i64(info[2]) * 1000u);
  return Napi::Boolean::New(env, done);
}

// threadRef(handle, on): whether a pending notification keeps the event loop alive.
Napi::Value ThreadRef(const Napi::CallbackInfo &info) {
  ARGS(2);
  ThreadHandle *h = handle(info[0]);
  if (!h || !h->thread) return fail(env, "threadRef: not a live vCPU thread");
  bool on = info[1].ToBoolean();
  if (on != h->ref) {
    if (on) napi_ref_threadsafe_function(env, h->tsfn);
    else napi_unref_threadsafe_function(env, h->tsfn);
    h->ref = on;
  }
  return env.Undefined();
}

// threadJoin(handle): after an exit command, waits for the thread and frees it.
Napi::Value ThreadJoin(const Napi::CallbackInfo &info) {
  ARGS(1);
  ThreadHandle *h = handle(info[0]);
  if (!h || !h->thread) return fail(env, "threadJoin: not a live vCPU thread");
  int64_t r = kh::thread_join(h->thread);
  h->thread = nullptr;
  napi_release_threadsafe_function(h->tsfn, napi_tsfn_release);
  h->tsfn = nullptr;
  h->ctl.Reset();
  h->console.Reset();
  return num(env, r);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("open", Napi::Function::New(env, Open));
  exports.Set("close", Napi::Function::New(env, Close));
  exports.Set("ioctl", Napi::Function::New(env, Ioctl));
  exports.Set("ioctlBuf", Napi::Function::New(env, IoctlBuf));
  exports.Set("mmap", Napi::Function::New(env, Mmap));
  exports.Set("munmap", Napi::Function::New(env, Munmap));
  exports.Set("addressOf", Napi::Function::New(env, AddressOf));
  exports.Set("madvise", Napi::Function::New(env, Madvise));
  exports.Set("mprotect", Napi::Function::New(env, Mprotect));
  exports.Set("unmapRange", Napi::Function::New(env, UnmapRange));
  exports.Set("remapRange", Napi::Function::New(env, RemapRange));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate));
  exports.Set("fallocate", Napi::Function::New(env, Fallocate));
  exports.Set("ftruncate", Napi::Function::New(env, Ftruncate));
  exports.Set("pread", Napi::Function::New(env, Pread));
  exports.Set("write", Napi::Function::New(env, Write));
  exports.Set("gettid", Napi::Function::New(env, Gettid));
  exports.Set("kickInstall", Napi::Function::New(env, KickInstall));
  exports.Set("kickSignal", Napi::Function::New(env, KickSignal));
  exports.Set("kick", Napi::Function::New(env, Kick));
  exports.Set("threadStart", Napi::Function::New(env, ThreadStart));
  exports.Set("threadPost", Napi::Function::New(env, ThreadPost));
  exports.Set("threadWait", Napi::Function::New(env, ThreadWait));
  exports.Set("threadRef", Napi::Function::New(env, ThreadRef));
  exports.Set("threadJoin", Napi::Function::New(env, ThreadJoin));
  return exports;
}

}  // namespace

NODE_API_MODULE(kvmharness, Init)
