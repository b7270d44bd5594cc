import Distributed
import Foundation
import TensorCore
import XCTest

/// The communicator of a process that no MPI launcher started: a job of one, MPI never initialised.
final class CommunicatorTests: XCTestCase {
    func testWithoutLauncherIsAJobOfOne() throws {
        XCTAssertFalse(Communicator.launchedByMPI(environment: [:]))
        XCTAssertTrue(Communicator.launchedByMPI(environment: ["OMPI_COMM_WORLD_SIZE": "2"]))
        XCTAssertTrue(Communicator.launchedByMPI(environment: ["PMIX_RANK": "0"]))
        let c = try Communicator.start(environment: [:])
        XCTAssertEqual(c.backend, .singleProcess)
        XCTAssertEqual(c.rank, 0); XCTAssertEqual(c.size, 1); XCTAssertTrue(c.isRoot)
        // The collectives leave a single process's values as they are.
        var x: [Float] = [1, -2, 3]
        try x.withUnsafeMutableBufferPointer { try c.allreduceSum($0.baseAddress!, count: 3) }
        XCTAssertEqual(x, [1, -2, 3])
        XCTAssertEqual(try c.allreduceSum([0.5, 2]), [0.5, 2])
        XCTAssertEqual(try c.broadcast([7, 8, 9]), [7, 8, 9])
        try c.barrier()
        c.finish()
    }

    func testGradientSumScalesInAJobOfOne() throws {
        let p = Parameter(name: "w", value: Tensor(shape: [2, 2]))
        p.grad.assign(Tensor(shape: [2, 2], values: [1, 2, 3, 4]))
        try Communicator.single.sumGradients([p], scale: 0.5)
        XCTAssertEqual((0..<4).map { p.grad[$0] }, [0.5, 1, 1.5, 2])
    }

    func testShareDealsEveryIndexOnce() {
        XCTAssertEqual(Communicator.single.share(of: 3), [0, 1, 2])
        XCTAssertEqual(Communicator.single.share(of: 0), [])
    }

    func testThreadsPerRankFitTheCores() {
        let c = Communicator.single
        XCTAssertEqual(c.threadsPerRank(cores: 2, environment: ["OMPI_COMM_WORLD_LOCAL_SIZE": "2"]), 1)
        XCTAssertEqual(c.threadsPerRank(cores: 16, environment: ["OMPI_COMM_WORLD_LOCAL_SIZE": "4"]), 4)
        XCTAssertEqual(c.threadsPerRank(cores: 2, environment: ["OMPI_COMM_WORLD_LOCAL_SIZE": "3"]), 1, "never below one")
        XCTAssertEqual(c.threadsPerRank(cores: 8, environment: [:]), 8, "a job of one takes every core")
    }
}
