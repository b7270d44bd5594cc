import ArgumentParser
import Distributed
import Foundation
import TensorCore

/// Starts a training command's job: MPI's world when `mpirun` started this process, with the threads of
/// each rank (BLAS's unless OPENBLAS_NUM_THREADS says otherwise, and the kernels') set so that the ranks
/// on a machine times their threads fit its cores; a job of one process otherwise.
func startJob() throws -> Communicator {
    let comm = try runMapped { try Communicator.start() }
    guard comm.size > 1 else { return comm }
    let threads = comm.threadsPerRank(cores: Parallel.cores)
    Parallel.cores = threads
    if ProcessInfo.processInfo.environment["OPENBLAS_NUM_THREADS"] == nil { BLAS.threads = threads }
    if comm.isRoot { printError("MPI job: \(comm.size) processes, \(threads) thread\(threads == 1 ? "" : "s") each (BLAS \(BLAS.threads))") }
    return comm
}

/// Runs a training command's body in its job: MPI ends when it returns; a rank that fails ends every rank
/// at once (the others may be waiting for it in a collective call) with the failure's exit status.
func inJob<T>(_ comm: Communicator, _ body: () throws -> T) throws -> T {
    do {
        let result = try body()
        comm.finish()
        return result
    } catch {
        if comm.size > 1 {
            if !(error is ExitCode) { printError("error: \(error)") }
            printError("rank \(comm.rank) of \(comm.size) failed: ending the job")
            comm.abort(code: ExitStatus.failure)
        }
        throw error
    }
}

extension Communicator {
    /// Writes a line to standard error from rank 0 only (every rank of a job runs the same command).
    func say(_ line: String) { if isRoot { printError(line) } }

    /// Rewrites the progress line from rank 0 only.
    func progress(_ line: String) { if isRoot { printProgress(line) } }
}
