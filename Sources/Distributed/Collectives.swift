import CMPI
import Foundation
import TensorCore

/// The trainers' uses of the collective calls: gradients summed in one allreduce, state copied from the root.
extension Communicator {
    /// Sums the parameters' gradients over all ranks in one allreduce of a contiguous buffer (the
    /// gradients packed in parameter order, summed, unpacked), then scales them by `scale`. Every rank
    /// must pass the same parameters in the same order.
    public func sumGradients(_ params: [Parameter], scale: Float = 1) throws {
        if size > 1 {
            let total = params.reduce(0) { $0 + $1.grad.count }
            let flat = UnsafeMutablePointer<Float>.allocate(capacity: max(total, 1))
            defer { flat.deallocate() }
            var at = 0
            for p in params { (flat + at).update(from: p.grad.data, count: p.grad.count); at += p.grad.count }
            try allreduceSum(flat, count: total)
            at = 0
            for p in params { p.grad.data.update(from: flat + at, count: p.grad.count); at += p.grad.count }
        }
        if scale != 1 { for p in params { p.grad.scale(scale) } }
    }

    /// Copies the root's named tensors into every rank's tensors of the same names, after checking that
    /// every rank holds the same names and shapes (a rank started with another model or configuration
    /// would otherwise silently train something else). Names are taken in sorted order.
    public func broadcast(_ tensors: [(String, Tensor)], root: Int = 0) throws {
        guard size > 1 else { return }
        let sorted = tensors.sorted { $0.0 < $1.0 }
        let layout = sorted.map { "\($0.0)\($0.1.shape)" }.joined(separator: "\n")
        let rootLayout = try broadcast(Array(layout.utf8), root: root)
        let same = rootLayout == Array(layout.utf8)
        let disagreeing = try allreduceSum([same ? 0 : 1])[0]
        guard disagreeing == 0 else {
            throw DistributedError.invalidJob("\(Int(disagreeing)) of \(size) ranks hold other tensors than rank \(root) (another model, configuration or data?)"
                                              + (same ? "" : "; this rank (\(rank)) is one of them"))
        }
        for (_, t) in sorted { try broadcast(t.data, bytes: t.count * MemoryLayout<Float>.size, root: root) }
    }

    /// Ends the whole job at once (every rank) with `code`: for a rank that failed while the others may
    /// be waiting in a collective call. Nothing for a single process.
    public func abort(code: Int32) {
        guard backend == .mpi, size > 1 else { return }
        MPI_Abort(dafnet_mpi_comm_world(), code)
    }
}
