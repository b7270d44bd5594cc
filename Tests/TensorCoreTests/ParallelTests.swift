import XCTest
@testable import TensorCore

final class ParallelTests: XCTestCase {
    /// Products run side by side under `BLAS.singleThreaded` (OpenBLAS's workers stopped, one thread each)
    /// equal the same products on OpenBLAS's threads bit for bit, the thread count comes back afterwards,
    /// and threaded products after it (the workers started again) still equal them.
    func testSideBySideSingleThreadedProductsEqualThreadedOnes() {
        var rng = RNG(seed: 21)
        let rows = 36, inner = 1280, outs = [128, 64]
        let x = Tensor.uniform([rows, inner], -1, 1, rng: &rng)
        let weights = outs.map { Tensor.uniform([$0, inner], -1, 1, rng: &rng) }
        func product(_ i: Int) -> Tensor {
            let out = Tensor(shape: [rows, outs[i]])
            BLAS.gemm(out.data, x.data, weights[i].data, M: rows, N: outs[i], K: inner, transB: true)
            return out
        }
        let before = BLAS.threads
        BLAS.threads = 2
        defer { BLAS.threads = before }
        let threaded = outs.indices.map(product)
        let slots = ResultSlots<Tensor>(count: outs.count)
        let inside = BLAS.singleThreaded { () -> Int in
            Parallel.forEach(outs.count, costPerItem: Parallel.minimumWork) { i in slots[i] = product(i) }
            return BLAS.threads
        }
        XCTAssertEqual(inside, 1)
        XCTAssertEqual(BLAS.threads, 2)
        for i in outs.indices {
            XCTAssertEqual(slots[i]!.array, threaded[i].array, "product \(i) side by side")
            XCTAssertEqual(product(i).array, threaded[i].array, "product \(i) after the workers restarted")
        }
    }

    /// A parallel loop inside a chunk of another (a kernel of one of two networks run side by side) stays on
    /// the chunk's thread: the outer loop already holds the cores. Outside any loop, and after one, a loop
    /// splits again.
    func testALoopInsideALoopStaysOnItsThread() throws {
        try XCTSkipIf(Parallel.cores < 2, "one core: no loop splits")
        XCTAssertFalse(Parallel.insideLoop)
        let outer = ResultSlots<(inside: Bool, ranges: [Range<Int>])>(count: 2)
        Parallel.forEach(2, costPerItem: Parallel.minimumWork) { i in
            let lock = NSLock()
            var ranges: [Range<Int>] = []
            Parallel.forChunks(1_000, costPerItem: Parallel.minimumWork) { range in
                lock.lock(); ranges.append(range); lock.unlock()
            }
            outer[i] = (Parallel.insideLoop, ranges)
        }
        for i in 0..<2 {
            XCTAssertEqual(outer[i]!.inside, true, "chunk \(i) runs inside a loop")
            XCTAssertEqual(outer[i]!.ranges, [0..<1_000], "the inner loop of chunk \(i) ran as one chunk on its thread")
        }
        XCTAssertFalse(Parallel.insideLoop, "the calling thread is outside a loop again")
        let chunks = ResultSlots<Bool>(count: Parallel.cores)
        var calls = 0
        let lock = NSLock()
        Parallel.forChunks(Parallel.cores, costPerItem: Parallel.minimumWork) { range in
            lock.lock(); calls += 1; lock.unlock()
            for i in range { chunks[i] = true }
        }
        XCTAssertEqual(calls, Parallel.cores, "outside a loop the work splits into one chunk per core")
    }
}
