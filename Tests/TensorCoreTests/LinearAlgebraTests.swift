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

    /// A V diag(w) Vᵀ rebuilds the matrix and V is orthonormal, to double round-off (1e-10 on entries of order 10);
    /// eigenvalues ascend; a known 2 × 2 case gives its eigenvalues exactly.
    func testSymmetricEigenRebuildsTheMatrix() throws {
        var rng = RNG(seed: 4)
        let n = 23
        let mat = Tensor.uniform([n, n], -1, 1, rng: &rng)
        var a = [Double](repeating: 0, count: n * n)
        for i in 0..<n { for j in 0..<n { a[i * n + j] = Double(mat[i, j]) + Double(mat[j, i]) } }
        let (w, v) = try LinearAlgebra.symmetricEigen(a, n: n)
        XCTAssertEqual(w, w.sorted())
        for i in 0..<n {
            for j in 0..<n {
                var rebuilt = 0.0, dot = 0.0
                for k in 0..<n { rebuilt += v[i * n + k] * w[k] * v[j * n + k]; dot += v[k * n + i] * v[k * n + j] }
                XCTAssertEqual(rebuilt, a[i * n + j], accuracy: 1e-10)
                XCTAssertEqual(dot, i == j ? 1 : 0, accuracy: 1e-10)
            }
        }
        let (w2, _) = try LinearAlgebra.symmetricEigen([2, 1, 1, 2], n: 2)
        XCTAssertEqual(w2[0], 1, accuracy: 1e-14)
        XCTAssertEqual(w2[1], 3, accuracy: 1e-14)
    }
}
