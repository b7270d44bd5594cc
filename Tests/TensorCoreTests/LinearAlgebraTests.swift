import XCTest
@testable import TensorCore

final class LinearAlgebraTests: XCTestCase {
    /// A = MᵀM + I is symmetric positive definite; the solve's residual A·X − B is round-off of the float32
    /// conversion of X (the factorisation itself runs in double): 1e-4 of B's scale.
    func testCholeskySolveResidual() throws {
        var rng = RNG(seed: 9)
        let n = 37, m = 5
        let mat = Tensor.uniform([n, n], -1, 1, rng: &rng)
        let a = Tensor(shape: [n, n])
        BLAS.gemm(a.data, mat.data, mat.data, M: n, N: n, K: n, transA: true)
        for i in 0..<n { a[i, i] += 1 }
        let b = Tensor.uniform([n, m], -1, 1, rng: &rng)
        let x = try LinearAlgebra.Cholesky(a.array.map(Double.init), n: n).solve(b)
        let ax = Tensor(shape: [n, m])
        BLAS.gemm(ax.data, a.data, x.data, M: n, N: m, K: n)
        XCTAssertLessThan(ax.maxAbsDifference(b), 1e-4)
    }

    func testNotPositiveDefiniteIsAnError() {
        let a: [Double] = [1, 2, 2, 1]   // eigenvalues 3 and −1
        XCTAssertThrowsError(try LinearAlgebra.Cholesky(a, n: 2)) { error in
            XCTAssertEqual(error as? LinearAlgebra.Failure, .notPositiveDefinite(minor: 2))
        }
    }
}
