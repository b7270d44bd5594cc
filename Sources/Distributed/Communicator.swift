import CMPI
import Foundation

/// A failed collective call or a job whose ranks disagree.
public enum DistributedError: Error, CustomStringConvertible, Equatable {
    /// An MPI call returned an error code (with MPI's own description of it).
    case mpi(call: String, code: Int32, message: String)
    /// The ranks were started with settings that cannot work together.
    case invalidJob(String)

    public var description: String {
        switch self {
        case let .mpi(call, code, message): return "MPI \(call) failed (code \(code)): \(message)"
        case let .invalidJob(why): return why
        }
    }
}

/// The processes of one training job and the few collective calls the trainers need: the rank and
/// size, a sum over every rank of a flat Float32 (or Float64) buffer, a broadcast of bytes from one
/// rank, a barrier. A process not started by `mpirun` is a job of one (`single`): the calls return
/// at once and MPI is never initialised, so every command runs without an MPI launcher as before.
public final class Communicator: @unchecked Sendable {
    /// How the job's processes talk.
    public enum Backend: Sendable, Equatable {
        /// One process, no MPI.
        case singleProcess
        /// `MPI_COMM_WORLD` of an Open MPI job.
        case mpi
    }

    public let backend: Backend
    public let rank: Int
    public let size: Int
    public var isRoot: Bool { rank == 0 }
    private var finished = false

    /// The job of one process.
    public static let single = Communicator(backend: .singleProcess, rank: 0, size: 1)

    private init(backend: Backend, rank: Int, size: Int) {
        self.backend = backend; self.rank = rank; self.size = size
    }

    /// Whether this process was started by an MPI launcher (Open MPI's `mpirun` puts the world size in
    /// every rank's environment; PMIx launchers such as `srun --mpi=pmix` set `PMIX_RANK`).
    public static func launchedByMPI(environment: [String: String] = ProcessInfo.processInfo.environment) -> Bool {
        environment["OMPI_COMM_WORLD_SIZE"] != nil || environment["PMIX_RANK"] != nil
    }

    /// The world of this process: MPI's when an MPI launcher started it (initialised here, errors
    /// returned rather than aborting), `single` otherwise.
    public static func start(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> Communicator {
        guard launchedByMPI(environment: environment) else { return .single }
        var initialised: Int32 = 0
        try check("MPI_Initialized", MPI_Initialized(&initialised))
        if initialised == 0 { try check("MPI_Init", MPI_Init(nil, nil)) }
        let world = dafnet_mpi_comm_world()
        try check("MPI_Comm_set_errhandler", MPI_Comm_set_errhandler(world, dafnet_mpi_errors_return()))
        var rank: Int32 = 0, size: Int32 = 0
        try check("MPI_Comm_rank", MPI_Comm_rank(world, &rank))
        try check("MPI_Comm_size", MPI_Comm_size(world, &size))
        return Communicator(backend: .mpi, rank: Int(rank), size: Int(size))
    }

    /// Ends MPI (once; nothing for a single process). No collective call may follow.
    public func finish() {
        guard backend == .mpi, !finished else { return }
        finished = true
        MPI_Finalize()
    }

    /// The largest element count of one MPI call (its counts are 32-bit); longer buffers go in pieces.
    static let maxCount = 1 << 30

    /// Replaces `buffer[0..<count]` on every rank by its sum over all ranks. The sum of two values is the
    /// same on both ranks (IEEE addition commutes); with more ranks MPI may add in another order on
    /// each, so trainers keep their ranks in step by other means as well (see `MetaTrainer`).
    public func allreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws {
        guard backend == .mpi, size > 1 else { return }
        var done = 0
        while done < count {
            let n = min(Self.maxCount, count - done)
            try Self.check("MPI_Allreduce", MPI_Allreduce(dafnet_mpi_in_place(), buffer + done, Int32(n), dafnet_mpi_float(), dafnet_mpi_sum(),
                                                          dafnet_mpi_comm_world()))
            done += n
        }
    }

    /// The sums over all ranks of a few Float64 values (losses, counts).
    public func allreduceSum(_ values: [Double]) throws -> [Double] {
        guard backend == .mpi, size > 1, !values.isEmpty else { return values }
        var out = values
        try out.withUnsafeMutableBufferPointer { p in
            try Self.check("MPI_Allreduce", MPI_Allreduce(dafnet_mpi_in_place(), p.baseAddress, Int32(p.count), dafnet_mpi_double(), dafnet_mpi_sum(),
                                                          dafnet_mpi_comm_world()))
        }
        return out
    }

    /// Copies `bytes` bytes at `buffer` from rank `root` to every other rank.
    public func broadcast(_ buffer: UnsafeMutableRawPointer, bytes: Int, root: Int = 0) throws {
        guard backend == .mpi, size > 1 else { return }
        var done = 0
        while done < bytes {
            let n = min(Self.maxCount, bytes - done)
            try Self.check("MPI_Bcast", MPI_Bcast(buffer + done, Int32(n), dafnet_mpi_byte(), Int32(root), dafnet_mpi_comm_world()))
            done += n
        }
    }

    /// Rank `root`'s bytes on every rank (the others' `data` is ignored; lengths may differ).
    public func broadcast(_ data: [UInt8], root: Int = 0) throws -> [UInt8] {
        guard backend == .mpi, size > 1 else { return data }
        var count = Int64(data.count)
        try broadcast(&count, bytes: 8, root: root)
        var out = rank == root ? data : [UInt8](repeating: 0, count: Int(count))
        try out.withUnsafeMutableBytes { try broadcast($0.baseAddress!, bytes: Int(count), root: root) }
        return out
    }

    /// Waits until every rank has arrived.
    public func barrier() throws {
        guard backend == .mpi, size > 1 else { return }
        try Self.check("MPI_Barrier", MPI_Barrier(dafnet_mpi_comm_world()))
    }

    /// Threads each rank of this machine may use so that ranks × threads fit its cores: the cores divided
    /// by the ranks started on this machine (Open MPI's `OMPI_COMM_WORLD_LOCAL_SIZE`; the world size when
    /// unknown), at least 1.
    public func threadsPerRank(cores: Int, environment: [String: String] = ProcessInfo.processInfo.environment) -> Int {
        let local = environment["OMPI_COMM_WORLD_LOCAL_SIZE"].flatMap(Int.init) ?? size
        return max(1, cores / max(local, 1))
    }

    /// The elements of `0..<count` this rank takes when they are dealt out in turn (i, i + size, …).
    public func share(of count: Int) -> [Int] { Array(stride(from: rank, to: count, by: size)) }

    static func check(_ call: String, _ code: Int32) throws {
        guard code != dafnet_mpi_success() else { return }
        var text = [CChar](repeating: 0, count: Int(MPI_MAX_ERROR_STRING) + 1)
        var length: Int32 = 0
        MPI_Error_string(code, &text, &length)
        throw DistributedError.mpi(call: call, code: code, message: String(cString: text))
    }
}
