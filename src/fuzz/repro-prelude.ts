// The fixed part of every C reproducer (repro-c.ts): the VM, its memslots
// and host memory, the vCPU run loop with the guest's channel, and one
// `expect_*` helper per kind of observation the scenario engine compares.
// Each helper prints the first mismatch in one line, named by step and field
// as the engine names its comparison, and exits 1. Only libc and
// <linux/kvm.h>.

/** C source that goes before the generated part. */
export const C_PRELUDE = String.raw`#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)
#endif
#ifndef MAP_HUGE_1GB
#define MAP_HUGE_1GB (30 << 26)
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 1U
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define KSFT_SKIP 4
#define X64 PRIx64

/* The guest's channel (src/arch/x86/layout.ts): out dx=CHANNEL_PORT, eax=op; sync carries its id in rdi, a value in rsi. */
#define CHANNEL_PORT 0x10
#define CONSOLE_PORT 0xe9
enum { OP_DONE = 0, OP_FAIL = 1, OP_SYNC = 2, OP_EXCEPTION = 3 };
/* The exception log the guest's handlers fill: u32 count, entries of {vector, error code, CR2, RIP} from +64. */
#define EXC_LOG 0x4000
#define EXC_LOG_HEADER 64
#define EXC_LOG_ENTRY 32
#define EXC_LOG_CAPACITY 126
/* What the host answers to MMIO reads. */
#define MMIO_FILL 0x5a
#define RUN_TIMEOUT_S 10

enum backing { ANON, THP, SHARED, MEMFD, HUGETLB_2M, HUGETLB_1G };

struct slot {
	uint32_t id;
	uint64_t gpa, size;
	uint32_t flags;
	enum backing backing;
	/* Placement (0: none): (hva - gpa) mod modulo = offset (src/kvm/memslot.ts placeBacking). */
	uint64_t modulo, offset;
	uint8_t *hva;
	/* The whole mapping the slot's memory is part of, and where the slot starts in the memfd. */
	uint8_t *map;
	uint64_t map_size, file_off;
	int memfd;
	int live;
};

#define NSLOTS 32
static struct slot slots[NSLOTS];
static int kvm_fd = -1, vm_fd = -1, vcpu_fd = -1;
static struct kvm_run *run;
static const char *step = "setup";

static inline void fail_errno(const char *what)
{
	printf("error: %s: %s: %s\n", step, what, strerror(errno));
	exit(2);
}

static inline void skip(const char *why)
{
	printf("skip: %s\n", why);
	exit(KSFT_SKIP);
}

/* The first mismatch: one line naming the step and the field, then exit 1. */
#define MISMATCH(field, fmt, ...)                                                   \
	do {                                                                        \
		printf("MISMATCH %s: %s: " fmt "\n", step, field, ##__VA_ARGS__);   \
		exit(1);                                                            \
	} while (0)

static inline struct slot *slot_by_id(uint32_t id)
{
	for (unsigned i = 0; i < NSLOTS; i++)
		if (slots[i].live && slots[i].id == id)
			return &slots[i];
	fprintf(stderr, "error: no memslot %u\n", id);
	exit(2);
}

/* Guest memory through the host mapping of the slot that holds [gpa, gpa + len). */
static inline uint8_t *gmem(uint64_t gpa, uint64_t len)
{
	for (unsigned i = 0; i < NSLOTS; i++) {
		struct slot *s = &slots[i];
		if (s->live && gpa >= s->gpa && gpa + len <= s->gpa + s->size)
			return s->hva + (gpa - s->gpa);
	}
	printf("error: %s: GPA 0x%" X64 " is in no memslot\n", step, gpa);
	exit(2);
}

static inline uint64_t rd(uint64_t gpa, unsigned size)
{
	uint64_t v = 0;
	memcpy(&v, gmem(gpa, size), size);
	return v;
}

static inline void wr64(uint64_t gpa, uint64_t v)
{
	memcpy(gmem(gpa, 8), &v, 8);
}

static inline void set_region(const struct slot *s, uint64_t size)
{
	struct kvm_userspace_memory_region r = {
		.slot = s->id, .flags = s->flags, .guest_phys_addr = s->gpa,
		.memory_size = size, .userspace_addr = size ? (uint64_t)(uintptr_t)s->hva : 0,
	};
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r))
		fail_errno("KVM_SET_USER_MEMORY_REGION");
}

/* mmap flags of a backing (src/kvm/memslot.ts allocBacking). */
static inline int map_flags(enum backing b)
{
	switch (b) {
	case SHARED: return MAP_SHARED | MAP_ANONYMOUS;
	case MEMFD: return MAP_SHARED;
	case HUGETLB_2M: return MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB;
	case HUGETLB_1G: return MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_1GB;
	default: return MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
	}
}

/*
 * Host memory for a slot: anonymous without THP, THP (2 MiB aligned, MADV_HUGEPAGE), shared, memfd or
 * hugetlb. A placed slot (modulo != 0) is placed as the harness places it (src/kvm/memslot.ts
 * placeBacking): size + modulo bytes are mapped (whole huge pages for hugetlb), the slot starts where
 * (hva - gpa) mod modulo = offset, and the rest of the mapping is PROT_NONE (not for hugetlb).
 */
static inline void alloc_backing(struct slot *s)
{
	int prot = PROT_READ | PROT_WRITE;
	uint64_t huge = s->backing == HUGETLB_1G ? 1ULL << 30 : s->backing == HUGETLB_2M ? 2ULL << 20 : 4096;
	uint64_t total = s->modulo ? (s->size + s->modulo + huge - 1) / huge * huge : s->size;
	s->memfd = -1;
	s->file_off = 0;
	if (s->backing == MEMFD) {
		s->memfd = memfd_create("kvm-repro-slot", MFD_CLOEXEC);
		if (s->memfd < 0 || ftruncate(s->memfd, total))
			fail_errno("memfd");
	}
	if (s->backing == THP && !s->modulo) {
		uint64_t align = 2ULL << 20;
		uint8_t *p = mmap(NULL, s->size + align, prot, map_flags(THP), -1, 0);
		if (p == MAP_FAILED)
			fail_errno("mmap");
		uint8_t *a = (uint8_t *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
		if (a > p)
			munmap(p, a - p);
		munmap(a + s->size, p + align - a);
		s->map = s->hva = a;
	} else {
		s->map = mmap(NULL, total, prot, map_flags(s->backing), s->memfd, 0);
		if (s->map == MAP_FAILED) {
			if (s->backing == HUGETLB_2M || s->backing == HUGETLB_1G)
				skip("no hugetlb pages of the size a memslot needs (vm.nr_hugepages)");
			fail_errno("mmap");
		}
		s->hva = s->map;
	}
	s->map_size = total;
	if (s->backing == ANON || s->backing == THP)
		if (madvise(s->map, total, s->backing == THP ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
			fail_errno("madvise");
	if (s->modulo) {
		uint64_t base = ((s->gpa + s->offset - (uintptr_t)s->map) % s->modulo + s->modulo) % s->modulo;
		s->hva = s->map + base;
		s->file_off = base;
		if (s->backing != HUGETLB_2M && s->backing != HUGETLB_1G) {
			if (base && mprotect(s->map, base, PROT_NONE))
				fail_errno("mprotect");
			if (base + s->size < total && mprotect(s->hva + s->size, total - base - s->size, PROT_NONE))
				fail_errno("mprotect");
		}
	}
}

static inline void add_slot(struct slot *s)
{
	alloc_backing(s);
	s->live = 1;
	set_region(s, s->size);
	if (s->modulo)
		printf("memslot %u: HVA 0x%" X64 ", GPA 0x%" X64 ", placed: (HVA - GPA) mod 0x%" X64 " = 0x%" X64 "\n", s->id,
		       (uint64_t)(uintptr_t)s->hva, s->gpa, s->modulo, ((uint64_t)(uintptr_t)s->hva - s->gpa) % s->modulo);
}

static inline void delete_slot(struct slot *s)
{
	set_region(s, 0);
	munmap(s->map, s->map_size);
	if (s->memfd >= 0)
		close(s->memfd);
	s->live = 0;
}

/* mmap(MAP_FIXED) of fresh memory of the slot's backing over [off, off + size) (src/kvm/memslot.ts remap). */
static inline void remap_range(struct slot *s, uint64_t off, uint64_t size)
{
	void *p = mmap(s->hva + off, size, PROT_READ | PROT_WRITE, map_flags(s->backing) | MAP_FIXED,
		       s->backing == MEMFD ? s->memfd : -1, s->backing == MEMFD ? s->file_off + off : 0);
	if (p == MAP_FAILED)
		fail_errno("mmap(MAP_FIXED)");
	if ((s->backing == ANON || s->backing == THP) &&
	    madvise(s->hva + off, size, s->backing == THP ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
		fail_errno("madvise");
}

/* fallocate(PUNCH_HOLE | KEEP_SIZE) of [off, off + size) of a memfd slot's file. */
static inline void punch_hole(struct slot *s, uint64_t off, uint64_t size)
{
	if (fallocate(s->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, s->file_off + off, size))
		fail_errno("fallocate(PUNCH_HOLE)");
}

/* The VMM stores value in every 8-byte word of [gpa, gpa + size) through the slot's mapping. */
static inline void write_words(uint64_t gpa, uint64_t size, uint64_t value)
{
	uint8_t *p = gmem(gpa, size);
	for (uint64_t off = 0; off < size; off += 8)
		memcpy(p + off, &value, 8);
}

static inline void copy_in(uint32_t slot, uint64_t off, const uint64_t *words, uint64_t n)
{
	memcpy(slot_by_id(slot)->hva + off, words, n);
}

/* ---- the vCPU ---- */

static volatile sig_atomic_t timed_out;
static inline void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
}

enum stop_kind { STOP_SYNC, STOP_DONE, STOP_FAIL, STOP_EXCEPTION, STOP_MMIO, STOP_EFAULT, STOP_OTHER };
struct stop {
	enum stop_kind kind;
	uint64_t id, rsi;
	char desc[200];
};

static inline void get_regs(struct kvm_regs *r)
{
	if (ioctl(vcpu_fd, KVM_GET_REGS, r))
		fail_errno("KVM_GET_REGS");
}

static inline uint64_t get_cr2(void)
{
	struct kvm_sregs s;
	if (ioctl(vcpu_fd, KVM_GET_SREGS, &s))
		fail_errno("KVM_GET_SREGS");
	return s.cr2;
}

/* One KVM_RUN to the next stop of interest: console output is skipped, a run longer than RUN_TIMEOUT_S is a stop. */
static inline struct stop run_vcpu(void)
{
	struct stop st = { .kind = STOP_OTHER };
	for (;;) {
		timed_out = 0;
		alarm(RUN_TIMEOUT_S);
		int r = ioctl(vcpu_fd, KVM_RUN, 0);
		int err = errno;
		alarm(0);
		if (r < 0) {
			if (err == EINTR && timed_out) {
				snprintf(st.desc, sizeof(st.desc), "timeout (no exit in %d s)", RUN_TIMEOUT_S);
				return st;
			}
			if (err == EINTR)
				continue;
			st.kind = err == EFAULT ? STOP_EFAULT : STOP_OTHER;
			snprintf(st.desc, sizeof(st.desc), "KVM_RUN failed: %s", strerror(err));
			return st;
		}
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == CONSOLE_PORT)
			continue;
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == CHANNEL_PORT &&
		    run->io.direction == KVM_EXIT_IO_OUT && run->io.size == 4) {
			uint32_t op;
			struct kvm_regs regs;
			memcpy(&op, (uint8_t *)run + run->io.data_offset, 4);
			get_regs(&regs);
			switch (op) {
			case OP_SYNC:
				st.kind = STOP_SYNC;
				st.id = regs.rdi;
				st.rsi = regs.rsi;
				snprintf(st.desc, sizeof(st.desc), "sync %" PRIu64, (uint64_t)regs.rdi);
				return st;
			case OP_DONE:
				st.kind = STOP_DONE;
				snprintf(st.desc, sizeof(st.desc), "done");
				return st;
			case OP_FAIL:
				st.kind = STOP_FAIL;
				snprintf(st.desc, sizeof(st.desc), "guest failed: %.150s", (const char *)gmem(regs.rsi, 1));
				return st;
			case OP_EXCEPTION: {
				uint32_t n = (uint32_t)rd(EXC_LOG, 4);
				uint64_t e = EXC_LOG + EXC_LOG_HEADER + (uint64_t)((n ? n - 1 : 0) % EXC_LOG_CAPACITY) * EXC_LOG_ENTRY;
				st.kind = STOP_EXCEPTION;
				snprintf(st.desc, sizeof(st.desc),
					 "unexpected exception vector %" PRIu64 " error code 0x%" X64 " cr2 0x%" X64 " rip 0x%" X64,
					 rd(e, 8), rd(e + 8, 8), rd(e + 16, 8), rd(e + 24, 8));
				return st;
			}
			}
		}
		if (run->exit_reason == KVM_EXIT_MMIO) {
			st.kind = STOP_MMIO;
			snprintf(st.desc, sizeof(st.desc), "exit: mmio %s gpa 0x%" X64 " len %u",
				 run->mmio.is_write ? "write" : "read", (uint64_t)run->mmio.phys_addr, run->mmio.len);
			return st;
		}
		if (run->exit_reason == KVM_EXIT_IO)
			snprintf(st.desc, sizeof(st.desc), "exit: io %s port 0x%x size %u", run->io.direction ? "out" : "in",
				 run->io.port, run->io.size);
		else
			snprintf(st.desc, sizeof(st.desc), "exit: reason %u", run->exit_reason);
		return st;
	}
}

struct mmio {
	uint64_t gpa;
	uint32_t len, is_write;
	uint64_t data;
};

/* Runs a guest step: MMIO exits (up to 4) are recorded, reads completed with MMIO_FILL, and the guest run on. */
static inline struct stop run_step(struct mmio *seen, int *n)
{
	struct stop st = run_vcpu();
	*n = 0;
	while (st.kind == STOP_MMIO && *n < 4) {
		struct mmio *m = &seen[(*n)++];
		m->gpa = run->mmio.phys_addr;
		m->len = run->mmio.len;
		m->is_write = run->mmio.is_write;
		m->data = 0;
		if (m->is_write)
			memcpy(&m->data, run->mmio.data, m->len <= 8 ? m->len : 8);
		else
			memset(run->mmio.data, MMIO_FILL, sizeof(run->mmio.data));
		st = run_vcpu();
	}
	return st;
}

static inline void expect_mmio(int n, const struct mmio *seen, int want_n, const struct mmio *want)
{
	if (n != want_n && n == 0)
		MISMATCH("MMIO exits", "expected %d, observed none", want_n);
	if (n != want_n)
		MISMATCH("MMIO exits", "expected %d, observed %d, the first a %s of gpa 0x%" X64 " len %u", want_n, n,
			 seen[0].is_write ? "write" : "read", seen[0].gpa, seen[0].len);
	for (int i = 0; i < n; i++)
		if (seen[i].gpa != want[i].gpa || seen[i].len != want[i].len || seen[i].is_write != want[i].is_write ||
		    (want[i].is_write && seen[i].data != want[i].data))
			MISMATCH("MMIO exits",
				 "expected %s gpa 0x%" X64 " len %u data 0x%" X64 ", observed %s gpa 0x%" X64 " len %u data 0x%" X64,
				 want[i].is_write ? "write" : "read", want[i].gpa, want[i].len, want[i].data,
				 seen[i].is_write ? "write" : "read", seen[i].gpa, seen[i].len, seen[i].data);
}

static inline void expect_sync(struct stop st, uint64_t id)
{
	if (st.kind != STOP_SYNC || st.id != id)
		MISMATCH("guest reaches the end of the step", "expected sync %" PRIu64 ", observed %s", id, st.desc);
}

static inline void expect_stop_efault(const char *field, struct stop st)
{
	if (st.kind != STOP_EFAULT)
		MISMATCH(field, "expected KVM_RUN to fail with EFAULT, observed %s", st.desc);
}

struct exc {
	uint64_t vector, error_code, cr2;
};

static inline void clear_exceptions(void)
{
	memset(gmem(EXC_LOG, 4), 0, 4);
}

static inline void expect_exceptions(const char *field, int want_n, const struct exc *want)
{
	uint32_t n = (uint32_t)rd(EXC_LOG, 4);
	for (uint32_t i = 0; i < n || i < (uint32_t)want_n; i++) {
		uint64_t e = EXC_LOG + EXC_LOG_HEADER + (uint64_t)(i % EXC_LOG_CAPACITY) * EXC_LOG_ENTRY;
		char obs[80] = "none", exp[80] = "none";
		if (i < n)
			snprintf(obs, sizeof(obs), "vector %" PRIu64 " error code 0x%" X64 " cr2 0x%" X64, rd(e, 8),
				 rd(e + 8, 8), rd(e + 16, 8));
		if (i < (uint32_t)want_n)
			snprintf(exp, sizeof(exp), "vector %" PRIu64 " error code 0x%" X64 " cr2 0x%" X64,
				 want[i].vector, want[i].error_code, want[i].cr2);
		if (strcmp(obs, exp))
			MISMATCH(field, "exception %u: expected %s, observed %s (%u recorded, %d expected)", i, exp, obs, n,
				 want_n);
	}
}

static inline void expect_value(const char *field, unsigned size, uint64_t want, uint64_t seen)
{
	if (size < 8)
		seen &= (1ULL << (8 * size)) - 1;
	if (seen != want)
		MISMATCH(field, "expected 0x%" X64 ", observed 0x%" X64, want, seen);
}

/* A page-table entry after the step; alt is a second value the architecture allows (0: none). */
static inline void expect_pte(const char *field, int level, uint64_t at, uint64_t want, uint64_t alt)
{
	uint64_t seen = rd(at, 8);
	if (seen != want && !(alt && seen == alt))
		MISMATCH(field, "level-%d entry at 0x%" X64 ": expected 0x%" X64 ", observed 0x%" X64, level, at, want,
			 seen);
}

/* KVM_GET_DIRTY_LOG of a slot: the dirty pages in [lo, hi) must be want[], in order. */
static inline void expect_dirty(const char *field, uint32_t id, uint64_t lo, uint64_t hi, int want_n,
				const uint64_t *want)
{
	struct slot *s = slot_by_id(id);
	uint64_t npages = s->size >> 12;
	uint64_t *bitmap = calloc((npages + 63) / 64, 8);
	struct kvm_dirty_log log = { .slot = id, .dirty_bitmap = bitmap };
	if (!bitmap || ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log))
		fail_errno("KVM_GET_DIRTY_LOG");
	int k = 0;
	for (uint64_t p = 0; p < npages; p++) {
		if (!(bitmap[p / 64] >> (p % 64) & 1))
			continue;
		uint64_t gpa = s->gpa + (p << 12);
		if (gpa < lo || gpa >= hi)
			continue;
		if (k >= want_n || want[k] != gpa)
			MISMATCH(field, "0x%" X64 " is dirty, expected %s0x%" X64, gpa,
				 k < want_n ? "next " : "no more pages after ", k < want_n ? want[k] : (k ? want[k - 1] : 0));
		k++;
	}
	if (k < want_n)
		MISMATCH(field, "0x%" X64 " is not dirty (%d of %d expected pages seen)", want[k], k, want_n);
	free(bitmap);
}

/* KVM_CLEAR_DIRTY_LOG of pages [first, first + count) of a slot; refused: KVM must answer EINVAL. */
static inline void clear_dirty(const char *field, uint32_t id, uint64_t first, uint64_t count, int refused)
{
	uint64_t bytes = (count + 63) / 64 * 8 + 8;
	uint64_t *bitmap = malloc(bytes);
	if (!bitmap)
		fail_errno("malloc");
	memset(bitmap, 0xff, bytes);
	struct kvm_clear_dirty_log c = { .slot = id, .num_pages = (uint32_t)count, .first_page = first, .dirty_bitmap = bitmap };
	int r = ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &c);
	int err = errno;
	free(bitmap);
	if (refused && (r == 0 || err != EINVAL))
		MISMATCH(field, "expected EINVAL, observed %s", r ? strerror(err) : "ok");
	if (!refused && r)
		MISMATCH(field, "expected ok, observed %s", strerror(err));
}

static inline void expect_translate(uint64_t gva, int valid, uint64_t gpa)
{
	struct kvm_translation t = { .linear_address = gva };
	if (ioctl(vcpu_fd, KVM_TRANSLATE, &t))
		fail_errno("KVM_TRANSLATE");
	if (!!t.valid != valid || (valid && t.physical_address != gpa))
		MISMATCH("KVM_TRANSLATE", "expected %s 0x%" X64 ", observed %s 0x%" X64, valid ? "valid" : "invalid", gpa,
			 t.valid ? "valid" : "invalid", (uint64_t)t.physical_address);
}

/* The VM, memslot 0 and the vCPU as the harness brings them up (src/arch/x86/guest.ts X86Guest). */
static inline void create_vm(void)
{
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		skip("cannot open /dev/kvm");
	do
		vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	while (vm_fd < 0 && errno == EINTR);
	if (vm_fd < 0)
		fail_errno("KVM_CREATE_VM");
	struct sigaction sa = { .sa_handler = on_alarm };
	sigaction(SIGALRM, &sa, NULL);
}

static inline void create_vcpu(void)
{
	vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
	if (vcpu_fd < 0)
		fail_errno("KVM_CREATE_VCPU");
	int size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (size < 0)
		fail_errno("KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
	if (run == MAP_FAILED)
		fail_errno("mmap(kvm_run)");
	/* CPUID: everything KVM supports. */
	int n = 256;
	struct kvm_cpuid2 *cpuid;
	for (;;) {
		cpuid = calloc(1, sizeof(*cpuid) + n * sizeof(cpuid->entries[0]));
		cpuid->nent = n;
		if (!ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid))
			break;
		if (errno != E2BIG)
			fail_errno("KVM_GET_SUPPORTED_CPUID");
		free(cpuid);
		n *= 2;
	}
	if (ioctl(vcpu_fd, KVM_SET_CPUID2, cpuid))
		fail_errno("KVM_SET_CPUID2");
	free(cpuid);
}

static inline struct kvm_segment seg(uint16_t selector, uint8_t type, uint8_t l, uint8_t db)
{
	struct kvm_segment s = { .base = 0, .limit = 0xffffffff, .selector = selector, .type = type, .present = 1,
				 .dpl = 0, .db = db, .s = 1, .l = l, .g = 1 };
	return s;
}

/* Long mode entered directly (src/arch/x86/bringup.ts sregs/regs). */
static inline void set_long_mode(uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer, uint64_t rip, uint64_t rsp)
{
	struct kvm_sregs s;
	if (ioctl(vcpu_fd, KVM_GET_SREGS, &s))
		fail_errno("KVM_GET_SREGS");
	struct kvm_segment data = seg(0x10, 3, 0, 1);
	s.cs = seg(0x08, 11, 1, 0);
	s.ds = s.es = s.fs = s.gs = s.ss = data;
	s.tr = (struct kvm_segment){ .base = 0x2000, .limit = 0x67, .selector = 0x28, .type = 11, .present = 1 };
	s.ldt.unusable = 1;
	s.ldt.present = 0;
	s.ldt.selector = 0;
	s.gdt.base = 0x1000;
	s.gdt.limit = 0x2f;
	s.idt.base = 0x3000;
	s.idt.limit = 256 * 16 - 1;
	s.cr0 = cr0;
	s.cr3 = cr3;
	s.cr4 = cr4;
	s.efer = efer;
	if (ioctl(vcpu_fd, KVM_SET_SREGS, &s)) {
		if (errno == EINVAL && (cr4 & (1ULL << 12)))
			skip("KVM refuses CR4.LA57 (5-level paging) on this host");
		fail_errno("KVM_SET_SREGS");
	}
	struct kvm_regs r;
	get_regs(&r);
	r.rip = rip;
	r.rsp = rsp;
	r.rflags = 2;
	if (ioctl(vcpu_fd, KVM_SET_REGS, &r))
		fail_errno("KVM_SET_REGS");
}
`;
