//! Simulator half of build.rs: compiles every `kernels/*.cu` as C++20 together with the
//! simulator runtime (`kernels/sim/runtime.cpp`) and a generated kernel registry into the static
//! library `prm_sim`.
//!
//! Each `.cu` file is compiled through a generated `OUT_DIR/sim_kernels/<stem>.cpp` that only
//! `#include`s the original by absolute path, so the compiler treats it as C++ without relying on
//! `-x c++` ordering. The registry (`OUT_DIR/sim_kernels/registry.cpp`) lists every
//! `PRM_REGISTER_KERNEL(name)` (lines that start with one) as `{ "name", &prm_sim_trampoline_name }`; the runtime
//! references the table, so linking `prm_sim_launch` pulls every kernel object out of the
//! static library (no static-initialiser registration needed).
//!
//! `plan` writes the wrappers and the registry; `jobs` are the objects, one a file, which
//! build.rs runs on its thread pool beside nvcc's and takes from the kernel cache when it can;
//! `finish` archives them.
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cache::{KernelCache, KeyParts};
use crate::pool::Job;

/// The kernel names registered in one `.cu` source: every `PRM_REGISTER_KERNEL(name)` on lines
/// that start with one (comments and `#define`s are skipped). A line may hold several, as
/// `attention.cu` registers one head dim's kernels per line.
fn registered_kernels(src: &str) -> Vec<String> {
    const MARK: &str = "PRM_REGISTER_KERNEL(";
    let mut names = Vec::new();
    for line in src.lines() {
        let mut rest = line.trim_start();
        if !rest.starts_with(MARK) {
            continue;
        }
        while let Some(at) = rest.find(MARK) {
            rest = &rest[at + MARK.len()..];
            let Some(end) = rest.find(')') else { break };
            let name = rest[..end].trim();
            if !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
            {
                names.push(name.to_string());
            }
            rest = &rest[end..];
        }
    }
    names
}

/// One C++ translation unit of the simulator library.
struct Unit {
    source: PathBuf,
    /// The file whose bytes the unit compiles, and its name in the cache key: the kernel file
    /// (not its wrapper, which lives in this build's `OUT_DIR`: another for `cargo clippy`), the
    /// runtime's files, or the registry under a name of its own.
    reads: (String, PathBuf),
    /// Name of its object in the cache entry and in `OUT_DIR/sim_objects/`.
    object: String,
    /// Bytes of the file it compiles, which orders the jobs (longest first).
    size: u64,
    /// A kernel file (not the runtime or the registry): its object may hold no mutable global.
    kernel: bool,
}

/// The simulator library, planned: wrappers and registry written, objects not yet compiled.
pub struct SimBuild {
    build: cc::Build,
    units: Vec<Unit>,
    compiler: KeyParts,
    objects_dir: PathBuf,
}

pub fn plan() -> SimBuild {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let kernels_dir = root.join("kernels");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let out = out_dir.join("sim_kernels");
    fs::create_dir_all(&out).expect("create OUT_DIR/sim_kernels");
    let objects_dir = out_dir.join("sim_objects");
    fs::create_dir_all(&objects_dir).expect("create OUT_DIR/sim_objects");

    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        kernels_dir.join("sim").display()
    );

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels_dir)
        .expect("read kernels/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .warnings(false)
        .flag("-pthread")
        .include(&kernels_dir);

    let size = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
    let mut units = Vec::new();
    let mut kernels: Vec<String> = Vec::new();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let text =
            fs::read_to_string(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
        kernels.extend(registered_kernels(&text));
        let stem = src.file_stem().unwrap().to_string_lossy();
        let wrapper = out.join(format!("{stem}.cpp"));
        write_if_changed(&wrapper, &format!("#include \"{}\"\n", escape(src)));
        units.push(Unit {
            source: wrapper,
            reads: (src.display().to_string(), src.clone()),
            object: format!("{stem}.o"),
            size: size(src),
            kernel: true,
        });
    }
    kernels.sort();
    let before = kernels.len();
    kernels.dedup();
    assert_eq!(
        before,
        kernels.len(),
        "a kernel is registered twice in kernels/*.cu"
    );

    let mut reg = String::from(
        "// Generated by build/sim.rs: every PRM_REGISTER_KERNEL(name) of kernels/*.cu.\n\
         #include <cstddef>\n\
         extern \"C\" {\n\
         struct PrmSimKernel { const char* name; void (*fn)(void**); };\n",
    );
    for k in &kernels {
        writeln!(reg, "void prm_sim_trampoline_{k}(void**);").unwrap();
    }
    reg.push_str("extern const PrmSimKernel prm_sim_kernel_table[] = {\n");
    for k in &kernels {
        writeln!(reg, "    {{\"{k}\", &prm_sim_trampoline_{k}}},").unwrap();
    }
    reg.push_str("    {nullptr, nullptr},\n};\n");
    writeln!(
        reg,
        "extern const size_t prm_sim_kernel_count = {};",
        kernels.len()
    )
    .unwrap();
    reg.push_str("}\n");
    let registry = out.join("registry.cpp");
    write_if_changed(&registry, &reg);

    // PRM_SIM_UCONTEXT=1 switches fibers from the x86-64 context switch to ucontext's
    // swapcontext (what other architectures use), to test that path on x86-64.
    println!("cargo:rerun-if-env-changed=PRM_SIM_UCONTEXT");
    if std::env::var("PRM_SIM_UCONTEXT").is_ok_and(|v| v == "1") {
        build.define("PRM_SIM_UCONTEXT", None);
    }
    let runtime = |file: &str| {
        let path = kernels_dir.join("sim").join(file);
        (path.clone(), (path.display().to_string(), path))
    };
    for ((source, reads), object) in [
        (runtime("runtime.cpp"), "sim_runtime.o"),
        (runtime("memory.cpp"), "sim_memory.o"),
        (
            (
                registry.clone(),
                ("generated registry.cpp".into(), registry),
            ),
            "sim_registry.o",
        ),
    ] {
        units.push(Unit {
            size: size(&source),
            source,
            reads,
            object: object.into(),
            kernel: false,
        });
    }

    // The compiler and every flag cc will pass (CXXFLAGS, the target's, ours) key the cache.
    let tool = build.get_compiler();
    let mut compiler = KeyParts::default()
        .text("sim")
        .binary(&resolve(tool.path()));
    for arg in tool.args() {
        compiler = compiler.text(arg);
    }
    SimBuild {
        build,
        units,
        compiler,
        objects_dir,
    }
}

impl SimBuild {
    /// One job an object, with its cost estimate (source bytes): a cached object is copied, a
    /// missing one compiled and stored. Each returns the object's path, or the compiler's error.
    pub fn jobs<'a>(
        &'a self,
        cache: &'a KernelCache,
    ) -> Vec<(u64, Job<'a, Result<PathBuf, String>>)> {
        self.units
            .iter()
            .map(|unit| {
                let job: Job<'a, _> = Box::new(move || self.object(unit, cache));
                (unit.size, job)
            })
            .collect()
    }

    fn object(&self, unit: &Unit, cache: &KernelCache) -> Result<PathBuf, String> {
        let (name, path) = &unit.reads;
        let key = cache.key(&self.compiler.clone().contents(name, path));
        let dst = self.objects_dir.join(&unit.object);
        if let Some(entry) = cache.get(&key) {
            if fs::copy(entry.join(&unit.object), &dst).is_ok() {
                if unit.kernel {
                    refuse_mutable_globals(name, &dst)?;
                }
                return Ok(dst);
            }
        }
        let mut one = self.build.clone();
        one.file(&unit.source);
        let compiled = one
            .try_compile_intermediates()
            .map_err(|e| format!("{}: {e}", unit.source.display()))?;
        let [object] = compiled.as_slice() else {
            return Err(format!("{}: expected one object", unit.source.display()));
        };
        fs::copy(object, &dst).map_err(|e| format!("copy {}: {e}", object.display()))?;
        if unit.kernel {
            refuse_mutable_globals(name, &dst)?;
        }
        cache.put(&key, &[(&unit.object, &dst)]);
        Ok(dst)
    }

    /// Archives the objects into `libprm_sim.a` and tells cargo to link it; or the compiler's
    /// errors, for build.rs to report beside nvcc's.
    pub fn finish(self, objects: Vec<Result<PathBuf, String>>) -> Result<(), String> {
        let mut paths = Vec::new();
        let mut failures = Vec::new();
        for object in objects {
            match object {
                Ok(p) => paths.push(p),
                Err(e) => failures.push(e),
            }
        }
        if !failures.is_empty() {
            return Err(format!(
                "simulator build failed ({} of {} files):\n{}",
                failures.len(),
                self.units.len(),
                failures.join("\n")
            ));
        }
        let library = self.build.create_archive("prm_sim", &paths);
        cc::emit_link_directives(&self.build, &library);
        println!("cargo:rustc-link-lib=pthread");
        Ok(())
    }
}

/// Fails when a kernel file's object holds mutable state outside thread-local storage: a
/// `__device__` variable (the qualifier is empty here, so it is a plain global), a `static` in a
/// kernel, anything in `.data` or `.bss`. The simulator runs the launches of different devices
/// on different OS threads at once; only thread-local state (the launch coordinates, the
/// `PRM_SHARED_ARRAY` sites) is private to one of them, so such a global would be shared by
/// launches that must not see each other. On the GPU it would be one per device instead.
/// Read-only data (`.rodata`, `.data.rel.ro`) and the registration table's constructor
/// (`.init_array`) are fine. Cached objects are checked too (a few milliseconds each), so an
/// entry stored before the check existed cannot slip past it.
fn refuse_mutable_globals(source: &str, object: &Path) -> Result<(), String> {
    use object::{Object, ObjectSection, ObjectSymbol, SectionKind};
    let bytes = fs::read(object).map_err(|e| format!("read {}: {e}", object.display()))?;
    let file = object::File::parse(&*bytes)
        .map_err(|e| format!("{}: not an object file cc wrote: {e}", object.display()))?;
    let mutable = |kind: SectionKind, name: &str| {
        matches!(kind, SectionKind::Data | SectionKind::UninitializedData)
            && !name.starts_with(".data.rel.ro")
    };
    let mut found = Vec::new();
    for section in file.sections() {
        let name = section.name().unwrap_or("?");
        if section.size() == 0 || !mutable(section.kind(), name) {
            continue;
        }
        let symbols: Vec<&str> = file
            .symbols()
            .filter(|s| s.section_index() == Some(section.index()) && s.size() > 0)
            .filter_map(|s| s.name().ok())
            .collect();
        found.push(if symbols.is_empty() {
            format!("{} bytes in {name}", section.size())
        } else {
            format!("{} in {name}", symbols.join(", "))
        });
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{source} defines mutable global state ({}; C++ names, mangled). The simulator runs \
         launches of different devices on different threads at once, and would share it between \
         them. Pass state as a kernel argument or keep it in shared memory (PRM_SHARED_ARRAY); \
         constants may be `constexpr`, or `const` with a constant initialiser.",
        found.join("; ")
    ))
}

/// A bare program name (cc's `c++`) as the file PATH finds, so its identity can be read.
fn resolve(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| program.to_path_buf())
}

fn escape(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}
