/*
 * C reference for `npm run bench`: the same KVM work as bench/kvm.ts, with
 * nothing between the program and the ioctls. Only libc and <linux/kvm.h>.
 *
 *   ref exit_roundtrip N   real-mode guest `out 0xe9, al; jmp $-2`, one KVM_RUN
 *                          per exit; prints ns per exit
 *   ref vm_lifecycle N     N times: KVM_CREATE_VM, one 64 KiB memslot,
 *                          KVM_CREATE_VCPU, mmap kvm_run, real-mode registers,
 *                          run to HLT, munmap, close vCPU, close VM; prints µs
 *   ref vm_lifecycle_threaded N
 *                          the same, with KVM_RUN on a second thread that sleeps
 *                          on a futex between runs, pinned to the first one's
 *                          CPU, while the first one sleeps on a futex until the
 *                          run ends: the harness's thread design without
 *                          JavaScript
 *
 * Output: one JSON line on stdout, e.g.
 *   {"bench":"exit_roundtrip","n":30000,"ns_per_exit":9012.3}
 * Errors go to stderr with exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000u
#define CODE_GPA 0x1000u
#define PORT 0xe9

/* The guest programs; bench/kvm.ts writes the same bytes. */
static const uint8_t loop_code[] = {0xe6, PORT, 0xeb, 0xfc}; /* out 0xe9, al; jmp -4 */
static const uint8_t hlt_code[] = {0xf4};                    /* hlt */
/* 32-bit flat protected mode: mov edi, 0x100000; 1: mov [edi], al; add edi, 0x1000;
   dec ecx; jnz 1b; hlt — touches ECX pages from 1 MiB up. */
static const uint8_t touch_code[] = {0xbf, 0x00, 0x00, 0x10, 0x00, 0x88, 0x07, 0x81, 0xc7, 0x00,
                                     0x10, 0x00, 0x00, 0x49, 0x75, 0xf5, 0xf4};
#define TOUCH_BASE 0x100000UL

static void die(const char *what) {
  fprintf(stderr, "ref: %s: %s\n", what, strerror(errno));
  exit(1);
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

struct vm {
  int vm, vcpu;
  uint8_t *mem;
  struct kvm_run *run;
  size_t run_size;
};

/* Creates a VM with one 64 KiB slot at GPA 0 and one vCPU in real mode at CODE_GPA. */
static void vm_create(int kvm, size_t run_size, const uint8_t *code, size_t code_len, struct vm *v) {
  v->vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (v->vm < 0) die("KVM_CREATE_VM");
  v->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (v->mem == MAP_FAILED) die("mmap(guest memory)");
  memcpy(v->mem + CODE_GPA, code, code_len);
  struct kvm_userspace_memory_region region = {
      .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
      .userspace_addr = (uint64_t)(uintptr_t)v->mem,
  };
  if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
  v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
  if (v->vcpu < 0) die("KVM_CREATE_VCPU");
  v->run_size = run_size;
  v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
  if (v->run == MAP_FAILED) die("mmap(kvm_run)");

  struct kvm_sregs sregs;
  if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
  struct kvm_regs regs;
  memset(&regs, 0, sizeof regs);
  regs.rip = CODE_GPA;
  regs.rax = 'x';
  regs.rflags = 2;
  if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
}

static void vm_destroy(struct vm *v) {
  munmap(v->run, v->run_size);
  close(v->vcpu);
  close(v->vm);
  munmap(v->mem, MEM_SIZE);
}

static void expect_exit(struct vm *v, unsigned reason) {
  if (ioctl(v->vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
  if (v->run->exit_reason != reason) {
    fprintf(stderr, "ref: unexpected exit reason %u (wanted %u)\n", v->run->exit_reason, reason);
    exit(1);
  }
  if (reason == KVM_EXIT_IO && (v->run->io.port != PORT || v->run->io.direction != KVM_EXIT_IO_OUT)) {
    fprintf(stderr, "ref: unexpected port I/O exit on port 0x%x\n", v->run->io.port);
    exit(1);
  }
}

/* fault_in: a fresh VM whose guest writes one byte to each of n untouched pages; the time of the run. */
static double fault_in(int kvm, size_t run_size, long n) {
  size_t size = TOUCH_BASE + (size_t)n * 4096;
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) die("KVM_CREATE_VM");
  uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) die("mmap(guest memory)");
  memcpy(mem + CODE_GPA, touch_code, sizeof touch_code);
  struct kvm_userspace_memory_region region = {.slot = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = (uint64_t)(uintptr_t)mem};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) die("KVM_CREATE_VCPU");
  struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) die("mmap(kvm_run)");
  struct kvm_sregs s;
  if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
  struct kvm_segment flat = {.base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 3, .present = 1, .db = 1, .s = 1, .g = 1};
  s.ds = s.es = s.ss = s.fs = s.gs = flat;
  flat.selector = 0x8;
  flat.type = 11;
  s.cs = flat;
  s.cr0 |= 1;
  if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
  struct kvm_regs r;
  memset(&r, 0, sizeof r);
  r.rip = CODE_GPA;
  r.rcx = (uint64_t)n;
  r.rflags = 2;
  if (ioctl(vcpu, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");
  double t0 = now_ns();
  if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
  double t1 = now_ns();
  if (run->exit_reason != KVM_EXIT_HLT) {
    fprintf(stderr, "ref: fault_in: exit reason %u\n", run->exit_reason);
    exit(1);
  }
  munmap(run, run_size);
  close(vcpu);
  close(vm);
  munmap(mem, size);
  return t1 - t0;
}

/* The vCPU thread of vm_lifecycle_threaded: runs fd `run_fd` when `cmd` moves on. */
static int cmd, done, run_fd;
static long run_ret;
static pid_t vcpu_tid;
static int pinned_cpu = -1;
static void *vcpu_thread(void *arg) {
  int seen = 0;
  __atomic_store_n(&vcpu_tid, (pid_t)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
  for (;;) {
    while (__atomic_load_n(&cmd, __ATOMIC_SEQ_CST) == seen) syscall(SYS_futex, &cmd, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
    seen = __atomic_load_n(&cmd, __ATOMIC_SEQ_CST);
    run_ret = ioctl(run_fd, KVM_RUN, 0) < 0 ? -errno : 0;
    __atomic_store_n(&done, seen, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &done, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
  }
  return arg;
}

static void run_on_thread(struct vm *v) {
  /* Hand the run over on this CPU (the harness pins its vCPU thread the same way). */
  int cpu = sched_getcpu();
  if (cpu >= 0 && cpu != pinned_cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (sched_setaffinity(vcpu_tid, sizeof one, &one) == 0) pinned_cpu = cpu;
  }
  run_fd = v->vcpu;
  int seq = __atomic_add_fetch(&cmd, 1, __ATOMIC_SEQ_CST);
  syscall(SYS_futex, &cmd, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
  int d;
  while ((d = __atomic_load_n(&done, __ATOMIC_SEQ_CST)) != seq) syscall(SYS_futex, &done, FUTEX_WAIT_PRIVATE, d, NULL, NULL, 0);
  if (run_ret < 0) {
    errno = (int)-run_ret;
    die("KVM_RUN");
  }
  if (v->run->exit_reason != KVM_EXIT_HLT) {
    fprintf(stderr, "ref: unexpected exit reason %u (wanted %u)\n", v->run->exit_reason, KVM_EXIT_HLT);
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s exit_roundtrip|vm_lifecycle|vm_lifecycle_threaded|fault_in N\n", argv[0]);
    return 2;
  }
  long n = strtol(argv[2], NULL, 10);
  if (n <= 0) {
    fprintf(stderr, "ref: N must be positive\n");
    return 2;
  }
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) die("open /dev/kvm");
  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size < 0) die("KVM_GET_VCPU_MMAP_SIZE");

  if (strcmp(argv[1], "exit_roundtrip") == 0) {
    struct vm v;
    vm_create(kvm, (size_t)run_size, loop_code, sizeof loop_code, &v);
    for (int i = 0; i < 1000; i++) expect_exit(&v, KVM_EXIT_IO); /* warm-up */
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
      if (ioctl(v.vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
      /* what the harness's console loop reads per exit */
      if (v.run->exit_reason != KVM_EXIT_IO || v.run->io.port != PORT) {
        fprintf(stderr, "ref: unexpected exit reason %u\n", v.run->exit_reason);
        return 1;
      }
    }
    double t1 = now_ns();
    vm_destroy(&v);
    printf("{\"bench\":\"exit_roundtrip\",\"n\":%ld,\"ns_per_exit\":%.1f}\n", n, (t1 - t0) / (double)n);
  } else if (strcmp(argv[1], "vm_lifecycle") == 0) {
    struct vm v;
    vm_create(kvm, (size_t)run_size, hlt_code, sizeof hlt_code, &v); /* warm-up */
    expect_exit(&v, KVM_EXIT_HLT);
    vm_destroy(&v);
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
      vm_create(kvm, (size_t)run_size, hlt_code, sizeof hlt_code, &v);
      expect_exit(&v, KVM_EXIT_HLT);
      vm_destroy(&v);
    }
    double t1 = now_ns();
    printf("{\"bench\":\"vm_lifecycle\",\"n\":%ld,\"us_per_lifecycle\":%.1f}\n", n, (t1 - t0) / (double)n / 1e3);
  } else if (strcmp(argv[1], "vm_lifecycle_threaded") == 0) {
    pthread_t t;
    if (pthread_create(&t, NULL, vcpu_thread, NULL) != 0) die("pthread_create");
    while (__atomic_load_n(&vcpu_tid, __ATOMIC_SEQ_CST) == 0) sched_yield();
    struct vm v;
    vm_create(kvm, (size_t)run_size, hlt_code, sizeof hlt_code, &v); /* warm-up */
    run_on_thread(&v);
    vm_destroy(&v);
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
      vm_create(kvm, (size_t)run_size, hlt_code, sizeof hlt_code, &v);
      run_on_thread(&v);
      vm_destroy(&v);
    }
    double t1 = now_ns();
    printf("{\"bench\":\"vm_lifecycle_threaded\",\"n\":%ld,\"us_per_lifecycle\":%.1f}\n", n, (t1 - t0) / (double)n / 1e3);
  } else if (strcmp(argv[1], "fault_in") == 0) {
    fault_in(kvm, (size_t)run_size, 16); /* warm-up */
    double ns = fault_in(kvm, (size_t)run_size, n);
    printf("{\"bench\":\"fault_in\",\"n\":%ld,\"us_per_page\":%.3f}\n", n, ns / (double)n / 1e3);
  } else {
    fprintf(stderr, "ref: unknown bench '%s'\n", argv[1]);
    return 2;
  }
  close(kvm);
  return 0;
}
