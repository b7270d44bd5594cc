import Foundation
import Storage
import XCTest

/// `mpirun -np 2 dafnet train-editor` against the same run in one process: the same global batch gives
/// the same editor; a killed rank ends the job with a non-zero status; the job resumes from rank 0's
/// last checkpoint. Runs the `dafnet` executable built beside the tests and Open MPI's `mpirun`.
final class MPIJobTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func dafnet() throws -> URL {
        let dirs = [Bundle.main.bundleURL, Bundle.main.bundleURL.deletingLastPathComponent(),
                    Bundle(for: MPIJobTests.self).bundleURL.deletingLastPathComponent()]
        guard let url = dirs.map({ $0.appendingPathComponent("dafnet") }).first(where: { FileManager.default.isExecutableFile(atPath: $0.path) }) else {
            throw XCTSkip("the dafnet executable is not built beside the tests (run `swift build` first, or `swift test`, which builds it)")
        }
        return url
    }

    static func mpirun() throws -> URL {
        for dir in ["/usr/bin", "/usr/local/bin", "/opt/openmpi/bin"] {
            let url = URL(fileURLWithPath: dir).appendingPathComponent("mpirun")
            if FileManager.default.isExecutableFile(atPath: url.path) { return url }
        }
        XCTFail("mpirun not found: install openmpi-bin (.ci/run does)")
        throw XCTSkip("no mpirun")
    }

    var tmp: URL!

    override func setUpWithError() throws {
        tmp = FileManager.default.temporaryDirectory.appendingPathComponent("mpi-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        // A small editor (two modules, one-layer networks) and 60 meta-training edits: seconds a step.
        let config = """
        {"method": "dafnet", "modules": ["transformer.h.3.mlp.c_fc", "transformer.h.3.mlp.c_proj"], "edit_bias": false,
         "init_edit_lr": 0.0001,
         "aux_model": {"layer_n": 1, "inner_att_dim": 16, "ffn_dim": 32, "outer_att_dim": 16, "outer_att_head_n": 2,
                       "outer_score_att_dim": 8, "outer_score_att_head_n": 2, "norm_layer": "EBN"},
         "training": {"steps": STEPS, "seed": 3, "aux_lr": 0.001, "edit_lr_lr": 0.001, "curriculum": "linear", "max_seq": 4,
                      "grow_every": 3, "grow_by": 1, "loss_sample": 3, "episodes_per_step": 2, "checkpoint_every": 5, "log_every": 5}}
        """
        for steps in [10, 400] {
            try config.replacingOccurrences(of: "STEPS", with: String(steps)).write(to: tmp.appendingPathComponent("editor-\(steps).json"), atomically: true, encoding: .utf8)
        }
        let lines = try String(contentsOf: Self.root.appendingPathComponent("samples/dafset/train.jsonl"), encoding: .utf8)
            .split(separator: "\n").prefix(60)
        try (lines.joined(separator: "\n") + "\n").write(to: tmp.appendingPathComponent("edits.jsonl"), atomically: true, encoding: .utf8)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: tmp) }

    func arguments(steps: Int, run: String) -> [String] {
        ["train-editor", "--model", Self.root.appendingPathComponent("samples/model").path,
         "--config", tmp.appendingPathComponent("editor-\(steps).json").path, "--data", tmp.appendingPathComponent("edits.jsonl").path,
         "--run-dir", tmp.appendingPathComponent(run).path, "--no-eval"]
    }

    /// Starts a process with its output in a file; Open MPI may run as root here (CI does).
    func start(_ executable: URL, _ args: [String], log: String, environment: [String: String] = [:]) throws -> (Process, URL) {
        let p = Process()
        p.executableURL = executable
        p.arguments = args
        var env = ProcessInfo.processInfo.environment
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"; env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        env["OMPI_MCA_btl_vader_single_copy_mechanism"] = "none"
        env.merge(environment) { _, new in new }
        p.environment = env
        let url = tmp.appendingPathComponent(log)
        _ = FileManager.default.createFile(atPath: url.path, contents: nil)
        let h = try FileHandle(forWritingTo: url)
        p.standardOutput = h; p.standardError = h
        try p.run()
        return (p, url)
    }

    func runToEnd(_ executable: URL, _ args: [String], log: String, environment: [String: String] = [:]) throws -> (Int32, String) {
        let (p, url) = try start(executable, args, log: log, environment: environment)
        p.waitUntilExit()
        return (p.terminationStatus, (try? String(contentsOf: url, encoding: .utf8)) ?? "")
    }

    func tensors(_ run: String) throws -> [String: [Float]] {
        let f = try SafetensorsFile(contentsOf: tmp.appendingPathComponent("\(run)/editor/editor.safetensors"), mode: .read)
        var out: [String: [Float]] = [:]
        for name in f.tensorNames { let t = try f.tensor(name); out[name] = (0..<t.count).map { t[$0] } }
        return out
    }

    /// Ten steps of two episodes each: two ranks with one episode each end where one process with both does
    /// (both with one BLAS thread a process: OpenBLAS's sums depend on its thread count).
    /// The tolerance is the reduction order's: a shared network's gradient is (a₁+a₂)+(b₁+b₂) over two ranks
    /// and ((a₁+a₂)+b₁)+b₂ in one process, so sums differ in the last bits (float32: 6e-8 relative). Adam
    /// passes such differences on at about their relative size, except where a gradient is close to zero
    /// and its sign flips: there a step can differ by up to twice the learning rate (1e-3 here). So: the
    /// root-mean-square difference at most 1e-6 (measured: 4e-8) and the largest at most a tenth of the
    /// learning rate (measured: 2e-5). A wrong split is far outside both: one episode a step instead of
    /// two gives an RMS difference of 0.04.
    func testTwoRanksEndAtTheParametersOfOneProcess() throws {
        let dafnet = try Self.dafnet(), mpirun = try Self.mpirun()
        let (s1, log1) = try runToEnd(dafnet, arguments(steps: 10, run: "np1"), log: "np1.log", environment: ["OPENBLAS_NUM_THREADS": "1"])
        XCTAssertEqual(s1, 0, log1)
        let (s2, log2) = try runToEnd(mpirun, ["--oversubscribe", "-np", "2", dafnet.path] + arguments(steps: 10, run: "np2"), log: "np2.log")
        XCTAssertEqual(s2, 0, log2)
        let train2 = try String(contentsOf: tmp.appendingPathComponent("np2/train.log"), encoding: .utf8)
        XCTAssertTrue(train2.contains("2 processes, 2 episodes a step"), train2)
        XCTAssertTrue(log2.contains("MPI job: 2 processes, 1 thread each"), log2)
        let a = try tensors("np1"), b = try tensors("np2")
        XCTAssertEqual(Set(a.keys), Set(b.keys))
        var largest: Float = 0, squares = 0.0, count = 0
        for (name, x) in a {
            let y = b[name]!
            XCTAssertEqual(x.count, y.count, name)
            for i in x.indices { let d = abs(x[i] - y[i]); largest = max(largest, d); squares += Double(d * d) }
            count += x.count
        }
        let rms = (squares / Double(max(count, 1))).squareRoot()
        print("np2 vs np1: largest |Δθ| \(largest), RMS \(rms) over \(count) values")
        XCTAssertLessThanOrEqual(rms, 1e-6, "np2 vs np1: RMS |Δθ|")
        XCTAssertLessThanOrEqual(largest, 1e-4, "np2 vs np1: largest |Δθ|")
    }

    /// `pretrain`: eight steps of a batch of four sequences, dealt out to two ranks, end at the parameters of
    /// one process (checkpoint tensors; the tolerance as above, Adam's learning rate here 1e-3).
    func testPretrainOnTwoRanksMatchesOneProcess() throws {
        let dafnet = try Self.dafnet(), mpirun = try Self.mpirun()
        let facts = try String(contentsOf: Self.root.appendingPathComponent("samples/world/facts.jsonl"), encoding: .utf8)
            .split(separator: "\n").prefix(150)
        try (facts.joined(separator: "\n") + "\n").write(to: tmp.appendingPathComponent("facts.jsonl"), atomically: true, encoding: .utf8)
        for run in ["p1", "p2"] {
            let config = """
            {"world": "\(tmp.appendingPathComponent("facts.jsonl").path)", "out": "\(tmp.appendingPathComponent("\(run)/model").path)",
             "run_dir": "\(tmp.appendingPathComponent(run).path)", "seed": 1, "vocab_size": 400, "n_embd": 32, "n_layer": 1, "n_head": 2,
             "n_positions": 64, "batch_size": 4, "seq_len": 64, "max_lr": 0.001, "min_lr": 0.0001, "warmup_steps": 2, "weight_decay": 0.01,
             "grad_clip": 1.0, "passes": 1, "checkpoint_every": 4, "log_every": 4}
            """
            try config.write(to: tmp.appendingPathComponent("\(run).json"), atomically: true, encoding: .utf8)
        }
        let (s1, log1) = try runToEnd(dafnet, ["pretrain", "--config", tmp.appendingPathComponent("p1.json").path, "--stop-after", "8"],
                                      log: "p1.log", environment: ["OPENBLAS_NUM_THREADS": "1"])
        XCTAssertEqual(s1, 0, log1)
        let (s2, log2) = try runToEnd(mpirun, ["--oversubscribe", "-np", "2", dafnet.path, "pretrain", "--config",
                                               tmp.appendingPathComponent("p2.json").path, "--stop-after", "8"], log: "p2.log")
        XCTAssertEqual(s2, 0, log2)
        XCTAssertTrue(try String(contentsOf: tmp.appendingPathComponent("p2/train.log"), encoding: .utf8).contains("start: 2 processes"))
        let a = try SafetensorsFile(contentsOf: tmp.appendingPathComponent("p1/checkpoint.safetensors"), mode: .read)
        let b = try SafetensorsFile(contentsOf: tmp.appendingPathComponent("p2/checkpoint.safetensors"), mode: .read)
        XCTAssertEqual(a.metadata["step"], "8"); XCTAssertEqual(b.metadata["step"], "8")
        XCTAssertEqual(a.tensorNames, b.tensorNames)
        var largest: Float = 0, squares = 0.0, count = 0
        for name in a.tensorNames where !name.hasPrefix("adam.") {
            let x = try a.tensor(name), y = try b.tensor(name)
            for i in 0..<x.count { let d = abs(x[i] - y[i]); largest = max(largest, d); squares += Double(d * d) }
            count += x.count
        }
        let rms = (squares / Double(max(count, 1))).squareRoot()
        print("pretrain np2 vs np1: largest |Δθ| \(largest), RMS \(rms) over \(count) values")
        XCTAssertGreaterThan(count, 0)
        XCTAssertLessThanOrEqual(rms, 1e-6, "pretrain np2 vs np1: RMS |Δθ|")
        XCTAssertLessThanOrEqual(largest, 1e-4, "pretrain np2 vs np1: largest |Δθ|")
    }

    /// A rank killed mid-run ends the whole job with a non-zero status and mpirun's message; the same
    /// command resumes from rank 0's last checkpoint.
    func testAKilledRankEndsTheJobAndItResumes() throws {
        let dafnet = try Self.dafnet(), mpirun = try Self.mpirun()
        let args = ["--oversubscribe", "-np", "2", dafnet.path] + arguments(steps: 400, run: "killed")
        let (job, logURL) = try start(mpirun, args, log: "killed.log")
        let trainLog = tmp.appendingPathComponent("killed/train.log")
        let deadline = Date().addingTimeInterval(300)
        while Date() < deadline, job.isRunning,
              !((try? String(contentsOf: trainLog, encoding: .utf8)) ?? "").contains("step 15/") {
            Thread.sleep(forTimeInterval: 0.2)
        }
        guard let victim = Self.rankProcess(rank: 1, marker: tmp.appendingPathComponent("killed").path) else {
            job.terminate(); job.waitUntilExit()
            return XCTFail("rank 1 not found; log: \((try? String(contentsOf: logURL, encoding: .utf8)) ?? "")")
        }
        kill(victim, SIGKILL)
        let killedAt = Date()
        job.waitUntilExit()
        let log = (try? String(contentsOf: logURL, encoding: .utf8)) ?? ""
        XCTAssertNotEqual(job.terminationStatus, 0, log)
        XCTAssertLessThan(Date().timeIntervalSince(killedAt), 60, "the job ends soon after a rank dies")
        XCTAssertTrue(log.contains("signal 9") || log.localizedCaseInsensitiveContains("killed"), log)
        // Resume: the same command continues from rank 0's last checkpoint (step 10 or later: the log line of
        // step 15 precedes its checkpoint), here for three more steps.
        let index = try ShardedSafetensors(indexURL: tmp.appendingPathComponent("killed/checkpoint.safetensors.index.json"), mode: .read)
        let checkpointed = try XCTUnwrap(index.metadata["step"]?.stringValue.flatMap { Int($0) })
        XCTAssertGreaterThanOrEqual(checkpointed, 10)
        let (status, log2) = try runToEnd(mpirun, args + ["--stop-after", String(checkpointed + 3)], log: "resumed.log")
        XCTAssertEqual(status, 0, log2)
        let train = try String(contentsOf: trainLog, encoding: .utf8)
        XCTAssertTrue(train.contains("resumed at step \(checkpointed) "), train)
        XCTAssertTrue(train.contains("stopped at step \(checkpointed + 3)"), train)
    }

    /// The pid of the rank `rank` of a job whose command line contains `marker` (from /proc).
    static func rankProcess(rank: Int, marker: String) -> pid_t? {
        let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        for name in procs {
            guard let pid = pid_t(name), pid != getpid(),
                  let cmd = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
                  let env = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { continue }
            let command = String(decoding: cmd, as: UTF8.self), environment = String(decoding: env, as: UTF8.self)
            if command.contains(marker) && !command.contains("mpirun")
                && environment.split(separator: "\0").contains("OMPI_COMM_WORLD_RANK=\(rank)") {
                return pid
            }
        }
        return nil
    }
}
