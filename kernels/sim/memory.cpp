// memory.cpp: the simulator's device memory, with a guard page at one end of every buffer.
//
// Each allocation is its own anonymous mapping, laid out so that the buffer (rounded up to 16
// bytes, the alignment kernels rely on) ends exactly where an inaccessible page begins, or (the
// reverse schedule's devices) starts exactly where one ends:
//
//     after:  [ slack | buffer bytes ][ guard page: PROT_NONE ]
//     before: [ guard page: PROT_NONE ][ buffer bytes | slack ]
//
// A kernel that reads or writes past the end of its buffer (a ragged tile's last row, a
// sequence's end computed wrongly), or before its start (an index of -1), therefore faults at
// once instead of reading a neighbour's bytes as it would on a GPU, where the same bug shows
// only as wrong numbers or, beyond the allocation, an illegal-address error that ends the CUDA
// context. The fault handler names the kernel, block and thread and aborts the process: a test
// that trips it fails loudly. The kernel tests run on both kinds of device, so both ends are
// checked. A write past an output buffer's last element but inside the 16-byte rounding (or a
// pooled buffer's unused capacity) is caught by the canary the launch puts there (`OutputTail`
// in src/gpu/device.rs); a read there reads that canary, NaN.
//
// Faults outside a simulator launch go to the handler that was installed before (Rust's stack
// overflow handler, or the default action).
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>

#include <sys/mman.h>
#include <unistd.h>

#include "sim.h"

namespace prm_sim {
namespace {

size_t page_bytes() {
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return page;
}

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

struct sigaction previous_segv, previous_bus;

void on_fault(int sig, siginfo_t* info, void* context) {
    char where[512];
    if (!describe_running_thread(where, sizeof where)) {
        // Not ours: hand the fault to whoever handled it before (the instruction re-runs).
        sigaction(sig, sig == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
        (void)context;
        return;
    }
    // Only async-signal-safe calls from here on (no snprintf, no allocation).
    char msg[1024];
    SignalSafeText t(msg, sizeof msg);
    t.text("prm sim: ").text(where).text(" touched address ").hex(reinterpret_cast<uintptr_t>(info->si_addr));
    t.text(", outside its buffers (").text(sig == SIGSEGV ? "SIGSEGV" : "SIGBUS");
    t.text("): past the end or before the start of a device buffer (each has an inaccessible page at one "
           "end), or a fiber's stack overflowed\n");
    ssize_t ignored = write(STDERR_FILENO, msg, t.len);
    (void)ignored;
    std::abort();
}

}  // namespace

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
    // The handler must not run on a fiber's stack (an overflow is one of the faults it
    // reports): give the launching thread an alternate signal stack unless it has one (Rust's
    // threads do).
    thread_local bool has_alt_stack = false;
    if (!has_alt_stack) {
        stack_t current;
        if (sigaltstack(nullptr, &current) == 0 && (current.ss_flags & SS_DISABLE)) {
            stack_t alt;
            alt.ss_size = 64 * 1024;
            alt.ss_sp = mmap(nullptr, alt.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            alt.ss_flags = 0;
            if (alt.ss_sp != MAP_FAILED) sigaltstack(&alt, nullptr);
        }
        has_alt_stack = true;
    }
}

}  // namespace prm_sim

using namespace prm_sim;

// A zeroed buffer of `bytes` (> 0), 16-byte aligned, that ends where an inaccessible page begins
// (guard_before == 0) or starts where one ends (otherwise); null when the memory cannot be
// mapped. Free with prm_sim_free(p, bytes, guard_before).
extern "C" void* prm_sim_alloc(size_t bytes, int guard_before) {
    const size_t page = page_bytes();
    const size_t data = round_up(bytes, 16);
    const size_t span = round_up(data, page);
    void* base = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    unsigned char* b = static_cast<unsigned char*>(base);
    unsigned char* guard = guard_before ? b : b + span;
    if (mprotect(guard, page, PROT_NONE) != 0) {
        munmap(base, span + page);
        return nullptr;
    }
    return guard_before ? b + page : b + span - data;
}

extern "C" void prm_sim_free(void* p, size_t bytes, int guard_before) {
    if (!p) return;
    const size_t page = page_bytes();
    const size_t data = round_up(bytes, 16);
    const size_t span = round_up(data, page);
    unsigned char* c = static_cast<unsigned char*>(p);
    munmap(guard_before ? c - page : c + data - span, span + page);
}
