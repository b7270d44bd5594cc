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
}
