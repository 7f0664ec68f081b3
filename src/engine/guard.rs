//! The per-isolate guard: how the isolate is stopped from outside (timeout, heap limit) and
//! the ArrayBuffer allocator that holds buffer memory to the isolate's heap budget.

use std::alloc::Layout;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use deno_core::v8;

/// Shared between an isolate's thread, the watchdog and the isolate's own callbacks.
pub struct Guard {
    handle: OnceLock<v8::IsolateHandle>,
    /// Set by the watchdog before it terminates a run that outlived its deadline.
    pub timed_out: AtomicBool,
    /// Set when the heap (or the ArrayBuffer budget) is exhausted, before termination.
    pub heap_exceeded: AtomicBool,
    /// Set by the watchdog before it terminates a run that used up its CPU time.
    pub cpu_exceeded: AtomicBool,
    buffers_used: AtomicUsize,
    buffers_cap: usize,
}

impl Guard {
    pub fn new(buffers_cap: usize) -> Arc<Guard> {
        Arc::new(Guard {
            handle: OnceLock::new(),
            timed_out: AtomicBool::new(false),
            heap_exceeded: AtomicBool::new(false),
            cpu_exceeded: AtomicBool::new(false),
            buffers_used: AtomicUsize::new(0),
            buffers_cap,
        })
    }

    pub fn attach(&self, handle: v8::IsolateHandle) {
        let _ = self.handle.set(handle);
    }

    /// Stops whatever JavaScript runs in the isolate; safe from any thread.
    pub fn terminate(&self) {
        if let Some(handle) = self.handle.get() {
            handle.terminate_execution();
        }
    }

    pub fn on_timeout(&self) {
        self.timed_out.store(true, Ordering::SeqCst);
        self.terminate();
    }

    pub fn on_cpu_limit(&self) {
        self.cpu_exceeded.store(true, Ordering::SeqCst);
        self.terminate();
    }

    pub fn on_heap_exhausted(&self) {
        self.heap_exceeded.store(true, Ordering::SeqCst);
        self.terminate();
    }

    /// Bytes held by the isolate's ArrayBuffers.
    pub fn buffers_used(&self) -> usize {
        self.buffers_used.load(Ordering::Relaxed)
    }

    /// Whether the isolate was stopped from outside and must not run again.
    pub fn tripped(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
            || self.heap_exceeded.load(Ordering::SeqCst)
            || self.cpu_exceeded.load(Ordering::SeqCst)
    }

    /// An ArrayBuffer allocator that refuses (and terminates the isolate) past the budget:
    /// buffer contents live outside the JavaScript heap, so the heap limit alone would let
    /// `new ArrayBuffer(2 ** 31)` through.
    pub fn allocator(self: &Arc<Self>) -> v8::UniqueRef<v8::Allocator> {
        static VTABLE: v8::RustAllocatorVtable<Guard> = v8::RustAllocatorVtable {
            allocate,
            allocate_uninitialized,
            free,
            drop: drop_guard,
        };
        // SAFETY: the pointer comes from `Arc::into_raw` and is released by `drop_guard`,
        // which the allocator calls exactly once; the vtable functions match `Guard`.
        unsafe { v8::new_rust_allocator(Arc::into_raw(self.clone()), &VTABLE) }
    }

    fn reserve(&self, len: usize) -> bool {
        let mut used = self.buffers_used.load(Ordering::Relaxed);
        loop {
            let next = match used.checked_add(len) {
                Some(next) if next <= self.buffers_cap => next,
                _ => return false,
            };
            match self.buffers_used.compare_exchange_weak(
                used,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => used = actual,
            }
        }
    }
}

const ALIGN: usize = 16;

fn layout(len: usize) -> Option<Layout> {
    Layout::from_size_align(len.max(1), ALIGN).ok()
}

fn alloc_with(guard: &Guard, len: usize, zeroed: bool) -> *mut c_void {
    let Some(layout) = layout(len) else {
        guard.on_heap_exhausted();
        return std::ptr::null_mut();
    };
    if !guard.reserve(len) {
        guard.on_heap_exhausted();
        return std::ptr::null_mut();
    }
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe {
        if zeroed {
            std::alloc::alloc_zeroed(layout)
        } else {
            std::alloc::alloc(layout)
        }
    };
    if ptr.is_null() {
        guard.buffers_used.fetch_sub(len, Ordering::Relaxed);
    }
    ptr.cast()
}

unsafe extern "C" fn allocate(guard: &Guard, len: usize) -> *mut c_void {
    alloc_with(guard, len, true)
}

unsafe extern "C" fn allocate_uninitialized(guard: &Guard, len: usize) -> *mut c_void {
    alloc_with(guard, len, false)
}

unsafe extern "C" fn free(guard: &Guard, data: *mut c_void, len: usize) {
    if data.is_null() {
        return;
    }
    if let Some(layout) = layout(len) {
        // SAFETY: `data` was returned by `alloc_with` for the same `len`, hence the same layout.
        unsafe { std::alloc::dealloc(data.cast(), layout) };
        guard.buffers_used.fetch_sub(len, Ordering::Relaxed);
    }
}

unsafe extern "C" fn drop_guard(guard: *const Guard) {
    // SAFETY: balances the `Arc::into_raw` in `Guard::allocator`.
    drop(unsafe { Arc::from_raw(guard) });
}
