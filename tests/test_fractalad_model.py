import pytest
import torch

from fractalad.backbones import build_backbone, load_pretrained
from fractalad.model import FractalAD, cosine_attention, distillation_loss, segmentation_loss
from compare import assert_apart, assert_close


def _prep(img, size=224):
    import cv2
    x = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255


def test_lite0_imagenet_weights_classify_skimage_photos():
    from skimage import data
    net = load_pretrained("efficientnet_lite0", with_head=True).eval()
    with torch.no_grad():
        cat = net.classify(_prep(data.chelsea())).topk(5).indices[0].tolist()
        coffee = net.classify(_prep(data.coffee())).topk(5).indices[0].tolist()
    assert cat[0] in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert {967, 968, 504} & set(coffee)  # espresso, cup, coffee mug


@pytest.mark.parametrize("kernel,stride,height,width", [
    (3, 1, 17, 20), (5, 1, 16, 19), (3, 2, 16, 16), (5, 2, 17, 10), (3, 2, 15, 9), (1, 1, 8, 11)])
def test_same_padding_equals_tensorflow_padding(kernel, stride, height, width):
    import math
    import torch.nn.functional as F
    from fractalad.backbones import Conv2dSame
    torch.manual_seed(0)
    conv, x = Conv2dSame(4, 6, kernel, stride=stride), torch.randn(2, 4, height, width)
    # TF "same": total padding so that out = ceil(in / stride), the odd pixel at the bottom/right
    ph = max((math.ceil(height / stride) - 1) * stride + kernel - height, 0)
    pw = max((math.ceil(width / stride) - 1) * stride + kernel - width, 0)
    want = F.conv2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), conv.weight,
                    conv.bias, stride)
    torch.testing.assert_close(conv(x), want)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "resnet50"])
def test_backbone_stage_strides(name):
    net = build_backbone(name).eval()
    with torch.no_grad():
        feats = net(torch.rand(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == list(net.channels)


def test_resnet_parameter_names_match_torchvision():
    keys = set(build_backbone("resnet18", with_head=True).state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
              "layer4.1.bn2.weight", "fc.weight", "fc.bias"):
        assert k in keys
    keys50 = set(build_backbone("wide_resnet50_2").state_dict())
    assert "layer3.5.conv3.weight" in keys50
    assert build_backbone("wide_resnet50_2").layer1[0].conv1.out_channels == 128


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights"):
        load_pretrained("resnet18", str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match="lack"):
        load_pretrained("resnet18", str(bad))


def test_no_gradient_reaches_student_through_attention():
    torch.manual_seed(0)
    model = FractalAD("resnet18", kd=True, pretrained=False).train()
    x = torch.rand(2, 3, 64, 64)
    model(x).sum().backward()
    assert all(p.grad is None for p in model.student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    t, s = torch.rand(1, 8, 4, 4), torch.rand(1, 8, 4, 4, requires_grad=True)
    assert not cosine_attention(t, s).requires_grad


def test_losses_behave():
    t = [torch.rand(2, 4, 8, 8)]
    assert distillation_loss(t, t).abs() < 1e-5
    assert distillation_loss(t, [-t[0]]) > 1.9
    mask = (torch.rand(2, 1, 16, 16) > 0.7).float()
    good = segmentation_loss(torch.where(mask > 0, 8.0, -8.0), mask)
    bad = segmentation_loss(torch.where(mask > 0, -8.0, 8.0), mask)
    assert good < 0.01 < 1.0 < bad


def test_texture_mode_has_no_student():
    model = FractalAD("efficientnet_lite0", kd=False, pretrained=False)
    assert model.student is None
    n, a, m = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64), torch.zeros(2, 1, 64, 64)
    total, kd, seg = model.training_losses(n, a, m)
    assert kd == 0 and torch.isfinite(total)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_blur_matches_opencv(sigma):
    import cv2
    import numpy as np
    from fractalad.model import gaussian_blur, gaussian_kernel
    x = np.random.default_rng(0).random((2, 3, 20, 24)).astype(np.float32)
    k = 2 * max(1, round(sigma * 3)) + 1  # OpenCV's default border (reflect 101) too
    ref = np.stack([[cv2.GaussianBlur(c, (k, k), sigma) for c in im] for im in x])
    got = gaussian_blur(torch.from_numpy(x), gaussian_kernel(sigma)).numpy()
    assert np.abs(got - ref).max() < 1e-5


def test_input_blur_is_part_of_the_model():
    from fractalad.model import gaussian_blur, gaussian_kernel
    torch.manual_seed(0)
    plain = FractalAD("resnet18", kd=True, pretrained=False).eval()
    blurred = FractalAD("resnet18", kd=True, pretrained=False, input_blur=0.7).eval()
    assert plain.state_dict().keys() == blurred.state_dict().keys()  # runs load either way
    blurred.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pre = plain.map_pair(gaussian_blur(x, gaussian_kernel(0.7)))
        assert_close(blurred.map_pair(x), pre, rtol=1e-5, atol=1e-5)
        assert_apart(plain.map_pair(x), pre, atol=1e-3, rtol=1e-5)
    nhwc = x.contiguous(memory_format=torch.channels_last)  # the GPU step's layout stays
    assert blurred.prepare(nhwc).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(blurred.prepare(nhwc), blurred.prepare(x))
    # training sees the same blurred inputs: equal losses on blurred twins
    mask = (torch.rand(2, 1, 64, 64) > 0.9).float()
    a = [float(v) for v in blurred.train().training_losses(x, x.flip(-1), mask)[1:]]
    b = [float(v) for v in plain.train().training_losses(gaussian_blur(x, gaussian_kernel(0.7)),
                                                         gaussian_blur(x.flip(-1), gaussian_kernel(0.7)),
                                                         mask)[1:]]
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("backbone,kd", [("efficientnet_lite0", True), ("resnet18", True),
                                         ("efficientnet_lite0", False)])
def test_folded_batch_norms_give_the_same_maps(backbone, kd):
    import copy
    torch.manual_seed(0)
    model = FractalAD(backbone, kd, pretrained=False, input_blur=0.5 if kd else 0.0)
    # batch-norm statistics and affine weights far from their initial 0 / 1, so a fold that
    # missed or misplaced one would show
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.running_mean, m.running_var, m.weight, m.bias):
                t.data = torch.rand_like(t) + 0.5
    model.eval()
    folded = copy.deepcopy(model).fold_batchnorm()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)
        if kd:
            assert_close(folded.map_pair(x), model.map_pair(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="folded into its convs, for inference only"):
        folded.train()
    folded.eval()  # still fine
